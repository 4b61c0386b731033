"""`clipforge serve` for real: a uvicorn server in a subprocess on 127.0.0.1, a real index, and the page
driven by Debian's chromium (headless, through Playwright; no browser download).

Without /usr/bin/chromium (`make test` installs it) the browser test skips, except in CI (`CI` true),
where that is a failure. The page's screenshot is kept under pytest's tmp dir (printed with -s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clipforge.apps.embed import EmbedConfig, embed
from clipforge.apps.index import build_index
from sample_files import COLOURS, colour_png

CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
START_TIMEOUT = 90  # seconds for the server to answer /healthz (a loaded 2-core machine imports slowly)
LABELS = ["red", "green", "blue"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_server(model: Path, index: Path, log: Path, *extra: str):
    """`clipforge serve` in a subprocess on a free 127.0.0.1 port: its base URL, killed on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "clipforge", "serve", "--model", str(model), "--index", str(index)]
    command += ["--port", str(port), "--log-level", "warning", *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                if get_json(url + "/healthz", timeout=2)["status"] == "ok":
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def site(eval_files, tmp_path_factory):
    """A folder of coloured squares with captions, embedded and indexed with the tiny model; the server."""
    root = tmp_path_factory.mktemp("site")
    images = root / "images"
    images.mkdir()
    for i in range(12):
        colour = list(COLOURS)[i % 3]
        (images / f"{colour}-{i:02d}.png").write_bytes(colour_png(colour, size=96, shade=8 * i))
        (images / f"{colour}-{i:02d}.txt").write_text(f"a {colour} square, number {i}")
    config = EmbedConfig(model=str(eval_files["model"]), out=str(root / "emb"), images=str(images), workers=0)
    embed(config, progress=False)
    build_index(root / "emb", root / "index", log=lambda _line: None)
    with running_server(eval_files["model"], root / "index", root / "server.log") as url:
        yield {"url": url, "images": images, "root": root}


def test_the_server_answers_over_http(site):
    health = get_json(site["url"] + "/healthz")
    assert health["index"]["count"] == 12
    results = get_json(site["url"] + "/search?q=a+red+square&k=5")["results"]
    assert len(results) == 5 and all(r["thumb"].startswith("data:image/jpeg;base64,") for r in results)
    assert all(r["caption"].startswith("a ") for r in results)


def test_a_60mb_upload_is_cut_off_by_the_real_server(site):
    """Raw HTTP/1.1 with a chunked body: the 413 arrives while the client is still sending, long before
    60 MB have gone out, and the server stays up."""
    port = int(site["url"].rsplit(":", 1)[1])
    head = (
        b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xyzzy\r\n\r\n"
    )
    preamble = (
        b'--xyzzy\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    head += b"%x\r\n%s\r\n" % (len(preamble), preamble)
    chunk = b"%x\r\n%s\r\n" % (1 << 20, bytes(1 << 20))
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        s.setblocking(False)
        deadline = time.monotonic() + 60
        while sent < 60_000_000 and time.monotonic() < deadline and not answer:
            with contextlib.suppress(BlockingIOError):
                answer = s.recv(65536)  # the server answered (or closed: b"" ends the loop too)
                break
            try:  # a non-blocking send may take part of a chunk: carry on from where it stopped
                n = s.send(chunk[sent % len(chunk) :])
                sent += n
            except BlockingIOError:  # the server is not reading: wait for its answer
                time.sleep(0.01)
            except OSError:  # it closed the connection after answering
                break
        s.settimeout(5)
        with contextlib.suppress(OSError):
            answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload limit" in answer
    assert sent < 40_000_000  # the limit (16 MiB) plus what the sockets' buffers hold, not 60 MB
    assert get_json(site["url"] + "/healthz")["status"] == "ok"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def launch_chromium(playwright):
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        message = f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; make test does it)"
        if in_ci():  # CI: the browser test must run
            pytest.fail(message + " [required in CI]", pytrace=False)
        pytest.skip(message)
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    return playwright.chromium.launch(
        executable_path=executable, headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"]
    )


def test_the_page_searches_and_labels_in_a_real_browser(site, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(30_000)
            page.goto(site["url"])
            sync_api.expect(page.locator("#meta")).to_contain_text("12 images indexed")

            page.fill("#query", "a green square")
            page.click("#search-button")
            results = page.locator("#grid .result")
            sync_api.expect(results).to_have_count(12)
            assert page.locator("#grid .result img").first.get_attribute("src").startswith("data:image/jpeg")
            captions = results.locator(".cap div").all_inner_texts()
            assert any("square, number" in text for text in captions)

            page.fill("#labels", ", ".join(LABELS))
            page.set_input_files("#file", str(site["images"] / "blue-02.png"))
            bars = page.locator("#bars .bar")
            sync_api.expect(bars).to_have_count(len(LABELS))
            shown = sorted(bars.locator(".name").all_inner_texts())
            assert shown == sorted(LABELS)
            percents = [float(t.rstrip("%")) for t in bars.locator(".pct").all_inner_texts()]
            assert percents == sorted(percents, reverse=True) and abs(sum(percents) - 100) < 0.5

            page.fill("#labels", "")  # an error shows on the page, the server stays up
            page.click("#classify-button")
            sync_api.expect(page.locator("#classify-error")).to_contain_text("labels: none given")

            shot = tmp_path / "serve-page.png"
            page.fill("#labels", ", ".join(LABELS))
            page.click("#classify-button")
            sync_api.expect(bars).to_have_count(len(LABELS))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            browser.close()
    assert get_json(site["url"] + "/healthz")["status"] == "ok"
