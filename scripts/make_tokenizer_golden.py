"""Make tests/fixtures/tokenizer/openai_golden.jsonl.gz: adversarial strings and OpenAI's own tokenization.

Runs in a separate environment that has OpenAI's reference code (the `clip` module, e.g. from the
`clip-anytorch` package), never in clipforge's: `$CLIPFORGE_BENCH_ENV`, built by
`bench/setup_env.sh $CLIPFORGE_BENCH_ENV` (docs/parity.md).

    $CLIPFORGE_BENCH_ENV/bin/python scripts/make_tokenizer_golden.py

The strings are generated here (seeded, so the file is reproducible) plus hand-written cases. For each string
the fixture records what OpenAI's code returns: `SimpleTokenizer.encode`, `decode` of that, and the
`clip.tokenize` rows with context_length 77 and 16, with truncate=False (null where it raises) and True.
Rows are stored without their trailing zero padding. Line 1 is a header with the versions used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import unicodedata
from importlib import metadata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer" / "openai_golden.jsonl.gz"
SHORT_CONTEXT = 16

_WORD_TEXT = """
a photo of the cat dog man woman child car tree house red blue green big small old new running sitting on in
at with under beside near bicycle street city beach mountain sunset night painting drawing clip art vector
icon emoji flag smiling face heart hand thumbs up person skin tone light medium dark
"""
WORDS = _WORD_TEXT.split()

HAND_WRITTEN = [
    "",
    " ",
    "\t\n\r ",
    "a",
    "A",
    "!",
    "a photo of a cat",
    "A Photo Of A CAT",
    "don't stop",
    "DON'T STOP",
    "they're we've I'm you'll he'd it's",
    "THEY'RE WE'VE I'M YOU'LL HE'D IT'S",
    "'s 't 're 've 'm 'll 'd",
    "''s '''t",
    "rock 'n' roll",
    "x'ſ",  # long s: a contraction under IGNORECASE
    "a\u0345b",  # ypogegrammeni: dropped by the pattern under IGNORECASE
    "it’s a “quoted” ‘word’",
    "don’t",
    "«guillemets» „low“ ‚single‘",
    "ﬁne ﬂour ﬀ ﬃ ﬄ ﬅ ﬆ",
    "ＦＵＬＬ　ＷＩＤＴＨ　１２３！",
    "ｈｅｌｌｏ，ｗｏｒｌｄ",
    "&amp; &lt;b&gt; &quot;x&quot; &#39;y&#39;",
    "&amp;amp; &amp;lt; &amp;amp;amp;lt;",
    "&eacute;t&eacute; &EACUTE;T&EACUTE; &nbsp;x&nbsp;",
    "fish &amp chips &ampx &lt3 &copy2024",
    "&#8217; &#x2019; &#X2019; &#128512; &#x1F600;",
    "&#0; &#1; &#x7f; &#128; &#x80; &#x9f; &#xD800; &#x110000; &#65535;",
    "&notanentity; &; &#; &#x;",
    "this&not that",
    "<b>bold</b> <i>it</i> <br/> <a href='http://x.org/?a=1&amp;b=2'>link</a>",
    "<p>&lt;p&gt; inside</p>",
    "< b > & < / b >",
    "café naïve résumé façade",
    "cafe\u0301 nai\u0308ve",  # combining marks: ftfy's NFC composes them
    "e&#769; composed later",  # unescaped after ftfy: not NFC-normalized
    "Ångström ÅNGSTRÖM",
    "ÀÉÎÕÜ àéîõü ÇĞİŞ çğış",
    "İstanbul",  # lower() gives i + combining dot
    "ΣΊΣΥΦΟΣ ΟΔΟΣ",  # final sigma
    "ß ẞ straße STRASSE",
    "ǅ ǈ ǋ ǲ",  # titlecase digraphs
    "Ⅻ ⅻ ① ⑳ ² ³ ½ ¾ ⁴ ₅",
    "٠١٢٣٤٥٦٧٨٩ ۰۱۲ ०१२ 一二三",
    "1234567890 3.14 1,000,000 -42 +7 1e10 0x1F",
    "2024-01-01 12:30:45",
    "日本語のテキスト",
    "中文文本，标点符号。",
    "한국어 텍스트입니다",
    "ไทย ภาษา",
    "עברית مرحبا بالعالم",
    "русский ТЕКСТ",
    "Ελληνικά",
    "हिन्दी",
    "😀 😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇩🇪 ❤️ ☺︎",
    "woman technologist: 👩🏿‍💻",
    "emoji:\U0001f600text",
    "keycap 1️⃣ #️⃣",
    "tag flag 🏴󠁧󠁢󠁷󠁬󠁳󠁿",
    "𝐛𝐨𝐥𝐝 𝑖𝑡𝑎𝑙𝑖𝑐 𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝟙𝟚𝟛",
    "Ⓐⓑⓒ 🅰🅱",
    "℃ ℉ № ™ ® © ℠",
    "…… ― — – ‐ ‒",
    "a\u00a0b\u2009c\u200bd\u3000e\u2028f\u2029g\u0085h",
    "a\u180eb\ufeffc\u2060d\u200ce\u200df",
    "a\x0bb\x0cc\x1cd\x1de\x1ef\x1fg",
    "a\x00b\x01c\x07d\x08e\x0ef\x7fg",
    "\x1b[31mred\x1b[0m terminal",
    "C1 \x80\x81\x85\x9f controls",
    "cafÃ© â€™s naÃ¯ve",
    "Ã¢â‚¬â„¢ double mojibake",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "ÐŸÑ€Ð¸Ð²ÐµÑ‚",
    "\ud83d\ude00 surrogate pair",
    "lone \ud800 surrogate",
    "lone \udfff low",
    "\ufffd replacement",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|STARTOFTEXT|> <|EndOfText|>",
    "a<|endoftext|>b",
    "!!<|endoftext|>",
    "<|endoftext|>!!",
    "x <|startoftext|><|endoftext|> y",
    "<|endoftext|",
    "</w>",
    "a</w>b </w></w>",
    "<w>",
    "hello!!! what??? wow...",
    "((nested)) [brackets] {braces}",
    "@user #hashtag $100 50% a&b a*b a^b ~tilde `tick` |pipe| \\back/slash",
    "http://example.com/path?query=1&x=2#frag",
    "user.name+tag@example.co.uk",
    "snake_case camelCase kebab-case PascalCase",
    "C++ C# F# .NET node.js",
    "tab\tseparated\tvalues",
    "line1\nline2\r\nline3\rline4",
    "   leading and trailing   ",
    "multiple     spaces    inside",
    "\u2003\u2003em spaces\u2003",
    "\\n literal backslash-n",
    "a" * 300,
    "ab" * 200,
    "z" * 1000,
    "!" * 200,
    "1" * 100,
    "😀" * 60,
    " ".join(["word"] * 74),
    " ".join(["word"] * 75),
    " ".join(["word"] * 76),
    " ".join(["word"] * 14),
    " ".join(["word"] * 15),
]

CONTROL_AND_SPACES = [chr(c) for c in [*range(0x00, 0x21), 0x7F, *range(0x80, 0xA1)]] + [
    "\u1680", "\u180e", *map(chr, range(0x2000, 0x200F)), "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
    "\ufeff", "\u2060", "\u00ad",
]  # fmt: skip
ENTITIES = [
    "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#39;", "&nbsp;", "&eacute;", "&EACUTE;", "&hellip;",
    "&mdash;", "&rsquo;", "&ldquo;", "&#8220;", "&#x201D;", "&#169;", "&copy;", "&COPY;", "&amp;amp;",
    "&amp;#39;", "&amp", "&lt", "&#128512;", "&#x1f600;", "&#0;", "&#x0;", "&#13;", "&#x85;", "&#150;",
    "&#xfffe;", "&Jscr;", "&NTILDE;", "&nTILDE;", "&ntilde;", "&sup2;", "&frac12;", "&#x0301;", "&fjlig;",
    "&NotEqualTilde;",
]  # fmt: skip
SCRIPTS = [
    (0x0041, 0x007A), (0x00C0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF),
    (0x0600, 0x06FF), (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x1E00, 0x1EFF), (0x2000, 0x206F),
    (0x20A0, 0x20CF), (0x2100, 0x218F), (0x2190, 0x23FF), (0x2460, 0x24FF), (0x2500, 0x27BF),
    (0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xF900, 0xFAFF),
    (0xFB00, 0xFB4F), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF), (0x0300, 0x036F), (0x1D400, 0x1D7FF),
    (0x1F300, 0x1FAFF), (0x1F1E6, 0x1F1FF), (0xE0000, 0xE007F), (0x10000, 0x1007F),
]  # fmt: skip
EMOJI_PARTS = ["😀", "👍", "👩", "👨", "👧", "🧑", "🏳", "🌈", "❤", "🐕", "🍕", "🚀", "☃", "✈"]
MODIFIERS = ["\u200d", "\ufe0f", "\ufe0e", "🏻", "🏼", "🏽", "🏾", "🏿", "\u20e3"]


def mojibake(text: str, rng: random.Random) -> str:
    """UTF-8 bytes read in a single-byte codec (what ftfy exists to undo), sometimes twice."""
    codec = rng.choice(["latin-1", "cp1252", "cp1252", "macroman"])
    out = text.encode("utf-8").decode(codec, errors="replace")
    if rng.random() < 0.2:
        out = out.encode("utf-8").decode(codec, errors="replace")
    return out


def random_script_text(rng: random.Random) -> str:
    lo, hi = rng.choice(SCRIPTS)
    chars = [chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))]
    return "".join(chars)


def caption_like(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
    if rng.random() < 0.4:
        words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10000)))
    sep = rng.choice([" ", " ", " ", ", ", " / ", ": ", " - "])
    return sep.join(words) + rng.choice(["", "", ".", "!", "?", "...", " :)"])


def mutate(text: str, rng: random.Random) -> str:
    """One random adversarial edit: the kinds of noise ftfy, unescape and the regex disagree about."""
    kind = rng.randrange(11)
    pos = rng.randint(0, len(text))
    insert = {
        0: lambda: rng.choice(CONTROL_AND_SPACES),
        1: lambda: rng.choice(ENTITIES),
        2: lambda: random_script_text(rng),
        3: lambda: rng.choice(EMOJI_PARTS) + "".join(rng.choices(MODIFIERS, k=rng.randint(0, 3))),
        4: lambda: rng.choice(["'s", "'T", "'re", "'VE", "'m", "'ll", "'d", "’s", "'", "''", "'x"]),
        5: lambda: rng.choice(
            ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "</w>", "<b>", "</a>", "<"]
        ),
        6: lambda: rng.choice(["“", "”", "‘", "’", "ﬁ", "ﬂ", "Ａ", "１", "！", "…", "—", "\u0301", "\u0308"]),
        7: lambda: "".join(rng.choices(" \t\n\r\u00a0\u3000", k=rng.randint(1, 5))),
        8: lambda: str(rng.randint(0, 10**9)) + rng.choice(["", "½", "²", "٣", "Ⅳ"]),
    }
    if kind in insert:
        return text[:pos] + insert[kind]() + text[pos:]
    if kind == 9:
        return mojibake(text, rng)
    return text.upper() if rng.random() < 0.5 else text.swapcase()


def ascii_noise(rng: random.Random) -> str:
    """Printable ASCII plus the whitespace the fast path allows and the characters it must refuse."""
    alphabet = "abcstrevmld'<|>!&;#0123456789 .,:-_/()ABCSTZ\t\n\r\x0b\x0c\x1c\x1f\x00\x1b\x7f"
    return "".join(rng.choices(alphabet, k=rng.randint(0, 40)))


def generate(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = list(HAND_WRITTEN)
    for _ in range(n // 4):
        texts.append(caption_like(rng))
    for _ in range(n // 4):
        text = caption_like(rng)
        for _ in range(rng.randint(1, 4)):
            text = mutate(text, rng)
        texts.append(text)
    for _ in range(n // 8):
        texts.append(ascii_noise(rng))
    for _ in range(n // 8):
        texts.append(" ".join(random_script_text(rng) for _ in range(rng.randint(1, 6))))
    for _ in range(n // 10):
        texts.append(mojibake(caption_like(rng) + " " + random_script_text(rng), rng))
    for _ in range(40):  # long texts, around and far past 77 tokens
        texts.append(" ".join(caption_like(rng) for _ in range(rng.randint(3, 40))))
    for text in list(texts[: len(HAND_WRITTEN)]):  # normalization variants of the hand-written cases
        texts.append(unicodedata.normalize("NFD", text))
        texts.append(unicodedata.normalize("NFKC", text))
    return list(dict.fromkeys(texts))


def trimmed(row: list[int]) -> list[int]:
    while row and row[-1] == 0:
        row.pop()
    return row


def golden_record(text: str, clip_module, tokenizer) -> dict:
    ids = tokenizer.encode(text)
    record = {"text": text, "ids": ids, "decoded": tokenizer.decode(ids)}
    for length, key in ((77, ""), (SHORT_CONTEXT, "_16")):
        try:
            record["row" + key] = trimmed(clip_module.tokenize(text, context_length=length)[0].tolist())
        except RuntimeError:  # OpenAI's "too long for context length"
            record["row" + key] = None
        record["trunc_row" + key] = trimmed(clip_module.tokenize(text, length, truncate=True)[0].tolist())
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n", type=int, default=2400, help="generated strings (the hand-written come on top)"
    )
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import clip  # OpenAI's code: only in the reference environment
    from clip.simple_tokenizer import SimpleTokenizer, default_bpe

    tokenizer = SimpleTokenizer()
    texts = generate(args.n, args.seed)
    header = {
        "meta": {
            "generator": "scripts/make_tokenizer_golden.py",
            "seed": args.seed,
            "count": len(texts),
            "short_context": SHORT_CONTEXT,
            "bpe_sha256": hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest(),
            "versions": {p: metadata.version(p) for p in ("clip-anytorch", "ftfy", "regex", "torch")},
            "python": sys.version.split()[0],
        }
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 in the gzip header: the same inputs give the same bytes.
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write((json.dumps(header) + "\n").encode())
        for text in texts:
            gz.write((json.dumps(golden_record(text, clip, tokenizer)) + "\n").encode())
    print(f"wrote {len(texts)} records to {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
