"""Download a URL to a local file: SHA-256 check, progress bar, retries and an atomic rename.

Used for anything clipforge fetches (the BPE vocabulary, model weights). The file appears at `dest` only once
it is complete and verified: bytes go to a temporary file in the same directory, which is renamed over
`dest` with `os.replace` (atomic on POSIX and Windows), so an interrupted or corrupt download never leaves a
half-written file where a later run would trust it, and two processes downloading at once cannot tear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["ChecksumError", "DownloadError", "download", "sha256_file"]

_CHUNK = 1 << 20
# Status codes that mean "try again later" rather than "this will never work".
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_USER_AGENT = "clipforge-download/1"


class ChecksumError(ValueError):
    """The downloaded bytes do not have the expected SHA-256 (the file was not kept)."""


class DownloadError(OSError):
    """The download failed, after all retries for a transient failure."""


class _Truncated(ConnectionError):
    """The server closed the connection before sending Content-Length bytes (transient)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None,
    retries: int = 3,
    *,
    progress: bool | None = None,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download `url` to `dest` and return `dest` as a Path.

    `sha256` (hex, any case) is checked before the file is moved into place; a mismatch raises
    `ChecksumError` and leaves nothing behind. `None` skips the check. If `dest` already exists and matches
    (or `sha256` is None) nothing is downloaded. Transient failures (connection errors, timeouts, truncated
    bodies, HTTP 408/425/429/5xx) are retried up to `retries` more times with exponential backoff starting at
    `backoff` seconds; other HTTP errors fail at once. `progress=None` shows a bar only on a terminal.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and (expected is None or sha256_file(dest) == expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _download_once(url, dest, expected, progress=progress, timeout=timeout)
            return dest
        except urllib.error.HTTPError as e:
            if e.code not in _TRANSIENT_HTTP or attempt == retries:
                raise DownloadError(f"downloading {url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            if attempt == retries:
                raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {e}") from e
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")  # the loop either returns or raises


def _download_once(
    url: str, dest: Path, expected: str | None, *, progress: bool | None, timeout: float
) -> None:
    """One attempt: stream into a temp file beside `dest`, verify, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            received = 0
            # tqdm's disable=None means "only on a terminal", which is what progress=None asks for.
            disable = None if progress is None else not progress
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=disable
            )
            with bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise _Truncated(f"got {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())  # the rename must not land before the data does
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(f"{url}: SHA-256 is {actual}, expected {expected}; the file was not kept")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
