"""COCO download machinery against a local HTTP server: resume, restarts, retries, checksums, atomic extraction."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from msdet.config import DownloadConfig
from msdet.data import download
from msdet.data.download import (
    MARKER_NAME,
    DownloadError,
    RemoteFile,
    coco2017_files,
    download_and_extract,
    fetch_coco2017,
)
from tests.helpers import config

CHUNK = 1024
DROP_AFTER = 10_000


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; every request is logged as (path, Range header)."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: int | None = None  # the next response stops after this many body bytes
    drop_every: bool = False  # ... and so does every later one
    stall_seconds: float = 0.0  # ... and waits this long before closing
    ignore_range: bool = False
    status: int | None = None  # answer every request with this error status
    lock: threading.Lock = field(default_factory=threading.Lock)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a handler thread for long

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        state: ServerState = self.server.state
        with state.lock:
            state.requests.append((self.path, self.headers.get("Range")))
            drop = state.drop_after
            if not state.drop_every:
                state.drop_after = None
        if state.status is not None:
            self.send_error(state.status)
            return
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/zip")
        self.end_headers()
        payload = body[start:] if drop is None else body[start:start + drop]
        self.wfile.write(payload)
        self.wfile.flush()
        if drop is not None and state.stall_seconds:
            time.sleep(state.stall_seconds)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A threaded HTTP/1.0 server on a free port of 127.0.0.1; stops at teardown or after 60 s regardless."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60.0, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield httpd
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def make_cfg(**kw) -> DownloadConfig:
    base = dict(retries=3, backoff_seconds=0.001, timeout_seconds=5.0, chunk_bytes=CHUNK)
    base.update(kw)
    return config("download", **base)


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def image_members(folder: str, n: int, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)  # incompressible, so the zips are tens of KB
    return {f"{folder}/{i:012d}.jpg": rng.integers(0, 256, 4000 + 37 * i, dtype=np.uint8).tobytes()
            for i in range(n)}


@pytest.fixture
def archives():
    """Two small archives in the COCO layout: images in ``train2017/``, JSON in ``annotations/``."""
    images = image_members("train2017", 8, seed=0)
    anns = {"annotations/instances_train2017.json": json.dumps({"images": [], "annotations": []}).encode(),
            "annotations/captions_train2017.json": b"{}"}
    return {"train2017.zip": (images, make_zip(images)), "annotations.zip": (anns, make_zip(anns))}


def publish(server, archives, names=None) -> list[RemoteFile]:
    files = []
    for name, (_, blob) in archives.items():
        if names is not None and name not in names:
            continue
        server.state.files[f"/zips/{name}"] = blob
        target = "annotations" if name.startswith("annotations") else name[:-4]
        files.append(RemoteFile(url=f"{server.base}/zips/{name}", name=name, targets=(target,), md5=md5(blob),
                                size=len(blob)))
    return files


def assert_tree(root: Path, members: dict[str, bytes]) -> None:
    for name, data in members.items():
        assert (root / name).read_bytes() == data, name
    folders = {name.split("/", 1)[0] for name in members}
    for folder in folders:
        on_disk = {str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.name != MARKER_NAME}
        assert on_disk == {n for n in members if n.startswith(folder + "/")}
        marker = json.loads((root / folder / MARKER_NAME).read_text())
        assert marker["files"] == len(on_disk)


def leftovers(root: Path) -> list[str]:
    """Temp dirs or partial files the downloader might leave behind."""
    names = [p.name for p in root.iterdir() if p.name.startswith(".")]
    if (root / "downloads").exists():
        names += [p.name for p in (root / "downloads").iterdir() if p.name.endswith(".part")]
    return names


# --------------------------------------------------------------------------------------------------


def test_full_download_and_extraction(server, archives, tmp_path):
    files = publish(server, archives)
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    for name, (members, blob) in archives.items():
        assert_tree(tmp_path, members)
        assert (tmp_path / "downloads" / name).read_bytes() == blob
    assert sorted(server.state.requests) == [("/zips/annotations.zip", None), ("/zips/train2017.zip", None)]
    assert leftovers(tmp_path) == []


def test_resume_after_dropped_connection(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    assert len(blob) > 3 * DROP_AFTER
    server.state.drop_after = DROP_AFTER
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == [("/zips/train2017.zip", None),
                                     ("/zips/train2017.zip", f"bytes={DROP_AFTER}-")]
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob
    assert_tree(tmp_path, members)
    assert leftovers(tmp_path) == []


def test_resume_after_timeout(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    server.state.drop_after, server.state.stall_seconds = DROP_AFTER, 1.5
    t0 = time.monotonic()
    download_and_extract(files, tmp_path, make_cfg(timeout_seconds=0.3), progress=False)
    assert time.monotonic() - t0 < 1.4  # gave up on the stalled socket instead of waiting for it to close
    (first, second) = [r for _, r in server.state.requests]
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second)[1])
    assert 0 < resumed_at <= DROP_AFTER  # a chunk cut short by the timeout is fetched again, not skipped
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob
    assert_tree(tmp_path, members)


def test_retry_budget_counts_attempts_without_progress(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    server.state.drop_after, server.state.drop_every = DROP_AFTER, True
    download_and_extract(files, tmp_path, make_cfg(retries=1), progress=False)
    starts = [0 if r is None else int(r[6:-1]) for _, r in server.state.requests]
    assert starts == list(range(0, len(blob), DROP_AFTER))  # every attempt progressed, so one retry sufficed
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob
    assert_tree(tmp_path, members)


def test_existing_part_file_is_continued_with_range(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "train2017.zip.part").write_bytes(blob[:12345])
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == [("/zips/train2017.zip", "bytes=12345-")]
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob
    assert_tree(tmp_path, members)


def test_complete_part_file_needs_no_body(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "train2017.zip.part").write_bytes(blob)
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == []  # the known size says the part is whole: only the MD5 is checked
    assert_tree(tmp_path, members)


def test_server_ignoring_range_restarts_cleanly(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    members, blob = archives["train2017.zip"]
    server.state.ignore_range = True
    (tmp_path / "downloads").mkdir()
    # Garbage prefix: appending a 200 body to it would corrupt the file, so this only passes on a clean restart.
    (tmp_path / "downloads" / "train2017.zip.part").write_bytes(b"\xff" * 5000)
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == [("/zips/train2017.zip", "bytes=5000-")]
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob
    assert_tree(tmp_path, members)


def test_dropped_connection_with_server_ignoring_range(server, archives, tmp_path):
    files = publish(server, archives, ["train2017.zip"])
    _, blob = archives["train2017.zip"]
    server.state.ignore_range, server.state.drop_after = True, DROP_AFTER
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert [r for _, r in server.state.requests] == [None, f"bytes={DROP_AFTER}-"]
    assert (tmp_path / "downloads" / "train2017.zip").read_bytes() == blob


def test_checksum_mismatch_is_rejected_and_nothing_half_extracted(server, archives, tmp_path):
    good = publish(server, archives, ["annotations.zip"])
    download_and_extract(good, tmp_path, make_cfg(), progress=False)
    (bad,) = publish(server, archives, ["train2017.zip"])
    bad = RemoteFile(url=bad.url, name=bad.name, targets=bad.targets, md5="0" * 32, size=bad.size)
    with pytest.raises(DownloadError, match=r"train2017\.zip: MD5 checksum mismatch.*expected 0{32}"):
        download_and_extract(good + [bad], tmp_path, make_cfg(), progress=False)
    assert not (tmp_path / "train2017").exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "downloads" / "train2017.zip").exists()
    assert (tmp_path / "downloads" / "train2017.zip.rejected").read_bytes() == archives["train2017.zip"][1]
    # the earlier, valid archive and its extraction are untouched
    assert_tree(tmp_path, archives["annotations.zip"][0])
    assert (tmp_path / "downloads" / "annotations.zip").read_bytes() == archives["annotations.zip"][1]


def test_bad_crc_is_rejected_and_nothing_half_extracted(server, tmp_path):
    members = image_members("val2017", 6, seed=1)
    blob = bytearray(make_zip(members, compression=zipfile.ZIP_STORED))
    victim = sorted(members)[3]
    offset = bytes(blob).index(members[victim])  # stored: the member's bytes appear verbatim
    blob[offset + 100] ^= 0xFF
    blob = bytes(blob)
    server.state.files["/zips/val2017.zip"] = blob
    remote = RemoteFile(url=f"{server.base}/zips/val2017.zip", name="val2017.zip", targets=("val2017",),
                        md5=md5(blob), size=len(blob))
    with pytest.raises(DownloadError, match=rf"val2017\.zip: member '{victim}' is corrupt \(Bad CRC-32"):
        download_and_extract([remote], tmp_path, make_cfg(), progress=False)
    assert not (tmp_path / "val2017").exists()
    assert leftovers(tmp_path) == []


def test_second_call_makes_no_request(server, archives, tmp_path):
    files = publish(server, archives)
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert len(server.state.requests) == 2
    server.state.requests.clear()
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == []
    inode = (tmp_path / "train2017").stat().st_ino
    download_and_extract(files, tmp_path, make_cfg(), progress=False, keep_archives=False)
    assert server.state.requests == []
    assert (tmp_path / "train2017").stat().st_ino == inode  # not re-extracted either
    # not even a connection: the same call succeeds with the server gone
    server.shutdown()
    server.server_close()
    download_and_extract(files, tmp_path, make_cfg(retries=0), progress=False)


def test_reextraction_from_kept_archive_needs_no_network(server, archives, tmp_path):
    files = publish(server, archives)
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    (tmp_path / "train2017" / MARKER_NAME).unlink()  # an extraction that never finished...
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    crashed = tmp_path / f".extract-train2017.zip.tmp@{socket.gethostname()}@{dead}@x"
    crashed.mkdir()
    os.replace(tmp_path / "train2017", crashed / "train2017")  # ...left in the dead process's temp dir
    server.state.requests.clear()
    download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert server.state.requests == []
    assert_tree(tmp_path, archives["train2017.zip"][0])
    assert leftovers(tmp_path) == []


def test_archives_removed_when_not_kept(server, archives, tmp_path):
    files = publish(server, archives)
    download_and_extract(files, tmp_path, make_cfg(), progress=False, keep_archives=False)
    assert list((tmp_path / "downloads").iterdir()) == []
    assert_tree(tmp_path, archives["train2017.zip"][0])


def test_retries_exhausted_names_the_url(server, archives, tmp_path, monkeypatch):
    files = publish(server, archives, ["train2017.zip"])
    server.state.status = 500
    delays = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    with pytest.raises(DownloadError, match=rf"{re.escape(files[0].url)}: giving up after 4 attempt.*HTTP 500"):
        download_and_extract(files, tmp_path, make_cfg(retries=3, backoff_seconds=0.5), progress=False)
    assert len(server.state.requests) == 4
    assert delays == [0.5, 1.0, 2.0]  # exponential backoff between the four attempts
    assert not (tmp_path / "train2017").exists()


def test_not_found_is_not_retried(server, tmp_path):
    remote = RemoteFile(url=f"{server.base}/zips/missing.zip", name="missing.zip", targets=("missing",))
    with pytest.raises(DownloadError, match=rf"{re.escape(remote.url)}: HTTP 404"):
        download_and_extract([remote], tmp_path, make_cfg(), progress=False)
    assert len(server.state.requests) == 1


def test_size_mismatch_is_rejected(server, archives, tmp_path):
    (remote,) = publish(server, archives, ["train2017.zip"])
    remote = RemoteFile(url=remote.url, name=remote.name, targets=remote.targets, md5=remote.md5,
                        size=remote.size + 1)
    with pytest.raises(DownloadError, match=rf"server reports {remote.size - 1} bytes, the table expects"):
        download_and_extract([remote], tmp_path, make_cfg(), progress=False)
    assert not (tmp_path / "train2017").exists()


def test_foreign_target_folder_is_not_overwritten(server, archives, tmp_path):
    files = publish(server, archives, ["annotations.zip"])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "mine.json").write_text("{}")
    with pytest.raises(DownloadError, match=r"annotations: exists but was not extracted by msdet"):
        download_and_extract(files, tmp_path, make_cfg(), progress=False)
    assert (tmp_path / "annotations" / "mine.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


def test_unexpected_zip_layout_is_rejected(server, tmp_path):
    blob = make_zip({"val2017/a.jpg": b"x", "stray.txt": b"y"})
    server.state.files["/v.zip"] = blob
    remote = RemoteFile(url=f"{server.base}/v.zip", name="v.zip", targets=("val2017",), md5=md5(blob))
    with pytest.raises(DownloadError, match=r"v\.zip: unexpected layout"):
        download_and_extract([remote], tmp_path, make_cfg(), progress=False)
    assert not (tmp_path / "val2017").exists()
    assert leftovers(tmp_path) == []


def test_official_table():
    files = {f.name: f for f in coco2017_files("http://images.cocodataset.org/")}
    assert files["train2017.zip"].url == "http://images.cocodataset.org/zips/train2017.zip"
    assert files["val2017.zip"].url == "http://images.cocodataset.org/zips/val2017.zip"
    assert files["annotations_trainval2017.zip"].url == (
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip")
    assert {n: (f.md5, f.size, f.targets) for n, f in files.items()} == {
        "train2017.zip": ("cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798, ("train2017",)),
        "val2017.zip": ("442b8da7639aecaf257c1dceb8ba8c80", 815_585_330, ("val2017",)),
        "annotations_trainval2017.zip": ("f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541, ("annotations",)),
    }


def test_fetch_coco2017_against_local_mirror(server, tmp_path, monkeypatch):
    train, val = image_members("train2017", 3, seed=2), image_members("val2017", 2, seed=3)
    anns = {"annotations/instances_train2017.json": b"{}", "annotations/instances_val2017.json": b"{}"}
    table = []
    for path, members in (("zips/train2017.zip", train), ("zips/val2017.zip", val),
                          ("annotations/annotations_trainval2017.zip", anns)):
        blob = make_zip(members)
        server.state.files["/" + path] = blob
        table.append((path, md5(blob), len(blob), (path.split("/")[-1].split("_")[0].removesuffix(".zip"),)))
    monkeypatch.setattr(download, "COCO2017_ARCHIVES", tuple(table))
    fetch_coco2017(tmp_path, make_cfg(base_url=server.base + "/"), progress=False)
    assert sorted(p for p, _ in server.state.requests) == [
        "/annotations/annotations_trainval2017.zip", "/zips/train2017.zip", "/zips/val2017.zip"]
    for members in (train, val, anns):
        assert_tree(tmp_path, members)
    server.state.requests.clear()
    fetch_coco2017(tmp_path, make_cfg(base_url=server.base), progress=False)
    assert server.state.requests == []
