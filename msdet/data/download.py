"""Download and unpack COCO 2017: resumable, verified, atomic, and free once done.

Each archive goes to ``<root>/downloads/<name>.part`` and is continued with an HTTP ``Range`` request after
an interruption (a server that ignores ``Range`` makes the transfer restart from zero). Only a transfer whose
size and MD5 match the table is renamed to ``<root>/downloads/<name>``. Extraction happens in a temporary
directory inside ``<root>``, reading every member in full so that ``zipfile`` checks its CRC-32, and each
top-level folder of the archive is then renamed into ``<root>`` with a completion marker inside. An archive
whose folders all carry a marker is skipped without touching the network.

Only the standard library speaks HTTP here (``urllib``), so proxies from the environment are honoured.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from msdet.atomic import owner_prefix, remove_stale, replace
from msdet.config import DownloadConfig
from msdet.errors import UserError

log = logging.getLogger(__name__)

MARKER_NAME = ".msdet-complete.json"
DOWNLOADS_DIR = "downloads"
_USER_AGENT = "msdet-download/1.0"
_MAX_DELAY_SECONDS = 600.0
# Status codes worth another try; everything else >= 400 (404, 403, ...) is final.
_TRANSIENT_STATUS = {408, 425, 429}

# (path under base_url, MD5, size in bytes, top-level folders inside the zip).
# MD5s as published alongside the COCO download links and used by e.g. PaddleDetection
# (ppdet/utils/download.py) and Google's task_adaptation COCO loader; sizes as served by
# images.cocodataset.org. Annotations first: small, so a broken setup fails fast.
COCO2017_ARCHIVES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541, ("annotations",)),
    ("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", 815_585_330, ("val2017",)),
    ("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798, ("train2017",)),
)


class DownloadError(UserError):
    """A download or extraction failed for good; the message names the URL or file and the problem."""


class _TransientError(Exception):
    """An attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class RemoteFile:
    """One zip archive to fetch: where from, what it must hash to, and which folders it holds."""

    url: str
    name: str
    targets: tuple[str, ...]
    md5: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        for part in (self.name, *self.targets):
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise ValueError(f"{self.url}: {part!r} is not a plain file or folder name")
        if not self.targets:
            raise ValueError(f"{self.url}: at least one target folder is required")
        if self.md5 is not None and not re.fullmatch(r"[0-9a-f]{32}", self.md5):
            raise ValueError(f"{self.url}: md5 {self.md5!r} is not 32 lowercase hex digits")
        if self.size is not None and self.size < 0:
            raise ValueError(f"{self.url}: size {self.size} is negative")


def coco2017_files(base_url: str) -> list[RemoteFile]:
    """The official COCO 2017 train/val images and train/val annotations, served from ``base_url``."""
    base = base_url.rstrip("/")
    return [RemoteFile(url=f"{base}/{path}", name=path.rsplit("/", 1)[-1], targets=targets, md5=md5, size=size)
            for path, md5, size, targets in COCO2017_ARCHIVES]


def fetch_coco2017(root: Path, cfg: DownloadConfig, progress: bool = True, keep_archives: bool = True) -> None:
    """Materialise ``<root>/train2017``, ``<root>/val2017`` and ``<root>/annotations`` from ``cfg.base_url``."""
    download_and_extract(coco2017_files(cfg.base_url), root, cfg, progress=progress, keep_archives=keep_archives)


def download_and_extract(files: Iterable[RemoteFile], root: Path, cfg: DownloadConfig, progress: bool = True,
                         keep_archives: bool = True) -> None:
    """Fetch and unpack each archive not yet complete under ``root``; archives stay in ``<root>/downloads``
    unless ``keep_archives`` is false (then a re-extraction needs the network again)."""
    root = Path(root)
    for remote in files:
        if is_extracted(remote, root):
            log.info("%s: already extracted in %s, skipping", remote.name, root)
            continue
        archive = download_file(remote, root / DOWNLOADS_DIR, cfg, progress=progress)
        extract_archive(archive, remote, root)
        if not keep_archives:
            archive.unlink()


def is_extracted(remote: RemoteFile, root: Path) -> bool:
    """True when every target folder of ``remote`` carries a marker written for this very archive."""
    for target in remote.targets:
        marker = Path(root) / target / MARKER_NAME
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("archive") != remote.name or info.get("md5") != remote.md5:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# download


class _PartialHash:
    """MD5 of the ``.part`` file kept in step with the bytes on disk, so resuming never re-reads them twice."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.count += len(chunk)

    def sync(self, path: Path, chunk_bytes: int) -> None:
        """Re-hash ``path`` from scratch if an interrupted write left the digest out of step with the file."""
        size = path.stat().st_size if path.exists() else 0
        if size == self.count:
            return
        self.reset()
        if size:
            with open(path, "rb") as f:
                while chunk := f.read(chunk_bytes):
                    self.update(chunk)


def download_file(remote: RemoteFile, downloads: Path, cfg: DownloadConfig, progress: bool = True) -> Path:
    """Fetch ``remote`` into ``downloads/<name>`` (resuming ``<name>.part``), verify it, and return its path.

    Retries with exponential backoff on network errors, timeouts and 5xx answers. The retry budget
    ``cfg.retries`` counts consecutive attempts that added no bytes, so a long transfer on a flaky link
    keeps going as long as it makes progress.
    """
    downloads = Path(downloads)
    final = downloads / remote.name
    if final.is_file():
        size = final.stat().st_size
        if remote.size is not None and size != remote.size:
            raise DownloadError(f"{final}: {size} bytes on disk, expected {remote.size}; delete it and run again")
        return final
    downloads.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    digest = _PartialHash()
    opener = urllib.request.build_opener()
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(opener, remote, part, digest, cfg, progress)
            break
        except (_TransientError, OSError, http.client.HTTPException) as exc:
            now = part.stat().st_size if part.exists() else 0
            failures = 0 if now > before else failures + 1
            if failures > cfg.retries:
                raise DownloadError(f"{remote.url}: giving up after {failures} attempt(s) without progress "
                                    f"({cfg.retries} retries): {_describe(exc)}") from exc
            delay = min(cfg.backoff_seconds * 2 ** max(failures - 1, 0), _MAX_DELAY_SECONDS)
            log.warning("%s: %s; retrying in %.3g s", remote.url, _describe(exc), delay)
            time.sleep(delay)
    _verify_and_publish(remote, part, final, digest, cfg)
    return final


def _attempt(opener: urllib.request.OpenerDirector, remote: RemoteFile, part: Path, digest: _PartialHash,
             cfg: DownloadConfig, progress: bool) -> None:
    """One HTTP request: continue ``part`` from its current size, or restart it if the server says 200."""
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None:
        if offset == remote.size:
            return
        if offset > remote.size:
            part.unlink()
            offset = 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
        response = opener.open(request, timeout=cfg.timeout_seconds)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            if _content_range(exc.headers.get("Content-Range"))[2] == offset:
                return  # the partial file already holds every byte
            part.unlink()
            raise _TransientError(f"HTTP 416 for bytes={offset}-, restarting from zero") from exc
        if exc.code >= 500 or exc.code in _TRANSIENT_STATUS:
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"{remote.url}: HTTP {exc.code} {exc.reason}") from exc
    with response:
        if response.status == 206 and offset:
            start, _, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _TransientError(f"asked to resume at byte {offset}, server sent from {start}; restarting")
            mode = "ab"
        elif response.status == 200:
            if offset:
                log.info("%s: server ignored the Range request, restarting from zero", remote.url)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise _TransientError(f"unexpected HTTP {response.status} for a download")
        if remote.size is not None and total is not None and total != remote.size:
            raise DownloadError(f"{remote.url}: server reports {total} bytes, the table expects {remote.size}; "
                                f"the file changed upstream or the table is wrong")
        total = remote.size if total is None else total
        if total is not None:
            _require_free_space(part.parent, total - offset, f"downloading {remote.url}")
        if mode == "wb":
            digest.reset()
        else:
            digest.sync(part, cfg.chunk_bytes)
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=remote.name, disable=not progress) as bar:
            while chunk := response.read(cfg.chunk_bytes):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _TransientError(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise _TransientError(f"received {size} bytes, more than the announced {total}; restarting")


def _verify_and_publish(remote: RemoteFile, part: Path, final: Path, digest: _PartialHash,
                        cfg: DownloadConfig) -> None:
    """Rename ``part`` to ``final`` if size and MD5 match; otherwise set it aside as ``<name>.rejected``."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        raise DownloadError(f"{part}: {size} bytes after download, expected {remote.size}")
    digest.sync(part, cfg.chunk_bytes)
    actual = digest.md5.hexdigest()
    if remote.md5 is not None and actual != remote.md5:
        rejected = final.with_name(final.name + ".rejected")
        os.replace(part, rejected)
        raise DownloadError(f"{remote.name}: MD5 checksum mismatch (got {actual}, expected {remote.md5}) for the "
                            f"download from {remote.url}; the bytes were moved to {rejected} and the next run "
                            f"downloads afresh")
    os.replace(part, final)


def _content_range(value: str | None) -> tuple[int, int, int | None]:
    """Parse ``bytes a-b/total`` or ``bytes */total`` into (a, b, total); start -1 for the second form."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        raise _TransientError(f"unusable Content-Range header {value!r}")
    start = int(match[1]) if match[1] is not None else -1
    end = int(match[2]) if match[2] is not None else -1
    total = int(match[3]) if match[3] != "*" else None
    return start, end, total


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"{type(exc).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, _TransientError) else str(exc)


def _require_free_space(path: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if needed > free:
        raise DownloadError(f"{path}: {what} needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
                            f"is free")


# --------------------------------------------------------------------------------------------------
# extraction


def extract_archive(archive: Path, remote: RemoteFile, root: Path) -> None:
    """Unpack ``archive`` so that each of ``remote.targets`` appears in ``root`` at once, complete, or not at all.

    Raises :class:`DownloadError` for a corrupt zip (bad CRC, truncated), for top-level entries other than
    the expected targets, and when a target folder exists that this module did not make.
    """
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for target in remote.targets:
        existing = root / target
        if existing.exists() and not (existing / MARKER_NAME).is_file():
            raise DownloadError(f"{existing}: exists but was not extracted by msdet (no {MARKER_NAME}); move it "
                                f"away or delete it so {archive.name} can be unpacked there")
    # the temporary folder names its process: a concurrent job's (a queued experiment's) is left alone
    kind = f"extract-{remote.name}"
    remove_stale(root, kind)
    tmp = Path(tempfile.mkdtemp(prefix=owner_prefix(kind), dir=root))
    try:
        counts = _extract_verified(archive, remote, tmp)
        for target in remote.targets:
            marker = {"archive": remote.name, "md5": remote.md5, "url": remote.url, "files": counts[target]}
            (tmp / target / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        for target in remote.targets:
            remove_stale(root, target)
            replace(tmp / target, root / target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: extracted %s into %s", archive.name, ", ".join(remote.targets), root)


def _extract_verified(archive: Path, remote: RemoteFile, dest: Path) -> dict[str, int]:
    """Extract every member into ``dest`` (CRC-checked on read) and count the files per target folder."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{archive}: not a readable zip archive ({exc}); delete it and run again") from exc
    with zf:
        infos = zf.infolist()
        tops = {info.filename.split("/", 1)[0] for info in infos}
        unexpected, missing = sorted(tops - set(remote.targets)), sorted(set(remote.targets) - tops)
        if unexpected or missing:
            raise DownloadError(f"{archive}: unexpected layout: top-level entries {sorted(tops)}, expected exactly "
                                f"{list(remote.targets)}")
        for target in remote.targets:
            if not any(info.filename.startswith(target + "/") for info in infos):
                raise DownloadError(f"{archive}: {target!r} is a file in the archive, expected a folder")
        _require_free_space(dest, sum(info.file_size for info in infos), f"extracting {archive.name}")
        counts = dict.fromkeys(remote.targets, 0)
        for info in infos:
            try:
                zf.extract(info, dest)
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise DownloadError(f"{archive}: member {info.filename!r} is corrupt ({exc}); delete the archive "
                                    f"and run again") from exc
            if not info.is_dir():
                counts[info.filename.split("/", 1)[0]] += 1
    return counts
