"""clipforge.download against a local HTTP server: checksum, retries, atomic placement, no leftovers."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from clipforge.download import ChecksumError, DownloadError, download, sha256_file

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: several read chunks
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[Counter[str]] = Counter()

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        n = self.hits[self.path]
        if self.path == "/missing":
            self.send_error(404)
        elif self.path == "/flaky" and n == 1:
            self.send_error(503)
        elif self.path == "/truncated" or (self.path == "/cut-once" and n == 1):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])  # then the connection closes early
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.hits = Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_downloads_and_verifies(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "file.bin"
    assert download(f"{server}/good", dest, DIGEST.upper(), progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["file.bin"]


def test_existing_verified_file_is_not_downloaded_again(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    download(f"{server}/good", dest, DIGEST, progress=False)
    download(f"{server}/good", dest, DIGEST, progress=False)
    assert _Handler.hits["/good"] == 1
    dest.write_bytes(b"corrupted")  # a cached file that no longer matches is replaced
    download(f"{server}/good", dest, DIGEST, progress=False)
    assert _Handler.hits["/good"] == 2 and sha256_file(dest) == DIGEST


def test_bad_checksum_raises_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    with pytest.raises(ChecksumError, match="SHA-256"):
        download(f"{server}/good", dest, "0" * 64, progress=False, backoff=0)
    assert _leftovers(tmp_path) == []
    assert _Handler.hits["/good"] == 1  # a wrong digest is not a transient failure


def test_bad_checksum_keeps_an_existing_file_untouched(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download(f"{server}/good", dest, "0" * 64, progress=False)
    assert dest.read_bytes() == b"old" and _leftovers(tmp_path) == ["file.bin"]


def test_retries_transient_http_error(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    download(f"{server}/flaky", dest, DIGEST, progress=False, backoff=0)
    assert _Handler.hits["/flaky"] == 2 and dest.read_bytes() == PAYLOAD


def test_retries_truncated_body(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    download(f"{server}/cut-once", dest, DIGEST, progress=False, backoff=0)
    assert _Handler.hits["/cut-once"] == 2 and dest.read_bytes() == PAYLOAD


def test_gives_up_after_retries(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="3 attempts"):
        download(f"{server}/truncated", tmp_path / "f", DIGEST, retries=2, progress=False, backoff=0)
    assert _Handler.hits["/truncated"] == 3 and _leftovers(tmp_path) == []


def test_permanent_http_error_is_not_retried(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/missing", tmp_path / "f", None, progress=False, backoff=0)
    assert _Handler.hits["/missing"] == 1 and _leftovers(tmp_path) == []


def test_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(DownloadError):  # port 9 (discard) on localhost: connection refused
        download("http://127.0.0.1:9/x", tmp_path / "f", None, retries=1, progress=False, backoff=0)
    assert _leftovers(tmp_path) == []


def test_no_checksum(server: str, tmp_path: Path) -> None:
    dest = download(f"{server}/good", tmp_path / "f", None, progress=False)
    assert dest.read_bytes() == PAYLOAD
