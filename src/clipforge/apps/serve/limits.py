"""What one request may ask of the server, and the checks that hold it to that.

Every limit is a field of `Limits` (a `clipforge serve` flag each). A request over a limit gets a 4xx JSON
body {"error": "..."} naming what was wrong, before the expensive part runs:
- the request body is counted as it arrives (`BodyLimit`, an ASGI middleware): a declared Content-Length
  over `max_upload_bytes` is refused before a byte is read, and a body without one (chunked) is refused as
  soon as it passes the limit -- a 60 MB upload is never read whole to be rejected;
- an upload must be an image by its declared content type and by the format its bytes decode as (a text
  file named .jpg is refused), and its header is read before its pixels: an image over `max_pixels` is
  refused undecoded (a decompression bomb is a few KB of PNG that declares gigabytes of pixels);
- label, template and prompt counts (labels x templates: the text encodes one classify costs), text
  length and the number of search results.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields

from PIL import Image, UnidentifiedImageError

from clipforge.transforms.loading import ImageTooLarge, check_pixels

# Formats a browser or a phone produces (MPO: a phone's multi-picture JPEG). Others (TIFF, PSD, ICO...) go
# through decoders a web upload has no need to reach.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 16 * 2**20  # a whole request body, multipart framing included
    max_pixels: int = 40_000_000  # width x height, from the image header (40 MP: larger than most phones')
    max_labels: int = 1000  # class names in one classify request
    max_templates: int = 100  # prompt templates in one classify request (ImageNet's set has 80)
    max_prompts: int = 10_000  # labels x templates: the texts one classify request may have encoded
    max_text_chars: int = 1000  # a query, a label, a template or a text to embed
    max_k: int = 100  # search results per query

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {field.name} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------------
# Texts and counts
# ----------------------------------------------------------------------------------------------------


def check_text(text: str, what: str, limits: Limits) -> str:
    """`text` stripped; a 400 if it is empty or longer than `max_text_chars`."""
    text = text.strip()
    if not text:
        raise RequestError(400, f"{what}: empty")
    if len(text) > limits.max_text_chars:
        raise RequestError(
            400, f"{what}: {len(text):,} characters, over the limit of {limits.max_text_chars:,}"
        )
    return text


def parse_labels(values: list[str], limits: Limits) -> list[str]:
    """Class names from form values, each comma-separated (or the field repeated); duplicates dropped."""
    labels = [part.strip() for value in values for part in value.split(",")]
    labels = list(dict.fromkeys(label for label in labels if label))
    if not labels:
        raise RequestError(400, "labels: none given (a comma-separated list, or the field repeated)")
    if len(labels) > limits.max_labels:
        raise RequestError(400, f"labels: {len(labels):,} labels, over the limit of {limits.max_labels:,}")
    for label in labels:
        check_text(label, "labels", limits)
    return labels


def parse_templates(values: list[str], limits: Limits) -> list[str]:
    """Prompt templates from form values, one a line (or the field repeated); each holds `{}`."""
    templates = [line.strip() for value in values for line in value.splitlines()]
    templates = list(dict.fromkeys(t for t in templates if t))
    if len(templates) > limits.max_templates:
        raise RequestError(
            400, f"templates: {len(templates):,} templates, over the limit of {limits.max_templates:,}"
        )
    for template in templates:
        check_text(template, "templates", limits)
        if "{}" not in template:
            raise RequestError(400, f"templates: {template!r} has no '{{}}' where the label goes")
    return templates


def check_prompts(labels: list[str], templates: list[str], limits: Limits) -> None:
    n = len(labels) * len(templates)
    if n > limits.max_prompts:
        raise RequestError(
            400,
            f"labels x templates: {len(labels):,} x {len(templates):,} = {n:,} prompts, over the limit "
            f"of {limits.max_prompts:,}",
        )


def parse_k(value: str | None, limits: Limits, default: int = 12) -> int:
    if value is None or value == "":
        return min(default, limits.max_k)
    try:
        k = int(value)
    except ValueError:
        raise RequestError(400, f"k: {value[:40]!r} is not an integer") from None
    if not 1 <= k <= limits.max_k:
        raise RequestError(400, f"k: {k} is outside 1..{limits.max_k}")
    return k


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def check_content_type(content_type: str | None, what: str = "image") -> None:
    """A 415 unless the declared type is an image's (or unspecific: octet-stream, or none at all)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind and not kind.startswith("image/") and kind != "application/octet-stream":
        raise RequestError(415, f"{what}: content type {kind!r} is not an image type")


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Decode uploaded bytes, refusing (before decoding pixels) anything that is not an allowed format or
    declares more than `max_pixels` pixels; a 400 for an image whose data is truncated or corrupt."""
    if not data:
        raise RequestError(400, f"{what}: empty file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise RequestError(415, f"{what}: not an image ({', '.join(ALLOWED_FORMATS)} accepted)") from None
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{what}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short or malformed
        raise RequestError(400, f"{what}: cannot be decoded (truncated or corrupt): {e}") from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(
            415, f"{what}: {image.format} images are not accepted ({', '.join(ALLOWED_FORMATS)})"
        )
    try:
        check_pixels(image.width, image.height, limits.max_pixels)
    except ImageTooLarge as e:
        raise RequestError(413, f"{what}: {e}") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying the data is bad
        raise RequestError(400, f"{what}: cannot be decoded (truncated or corrupt): {e}") from None
    return image


# ----------------------------------------------------------------------------------------------------
# The request body, counted as it arrives
# ----------------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """Raised from `receive` when the body passes the limit; `BodyLimit` turns it into a 413."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` without reading them whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> str:
        return f"request body is over the upload limit of {self.max_bytes:,} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"error": self._error()})  # not one byte of the body read
            return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, {"error": self._error()})


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    # The unread rest of the body makes the connection unusable for another request: close it.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
