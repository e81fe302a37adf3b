"""Write-then-rename helpers, so an interrupted stage never leaves a valid-looking artifact nor loses the old one.

A new file or folder is written under a temporary sibling name and renamed over the old one. An old folder
is renamed aside first and deleted only once the new one is in place: a kill at any moment leaves the old
tree or the new one under the final name, or (between the two renames) the old one aside, which the next
write of the same path puts back.

A set of files that belong together (a training run's checkpoints) is written into one staging folder,
``.<name>.set@...``, marked complete, then its files are renamed in one by one; a kill during those renames
leaves a complete staged set, which the next :func:`remove_stale` of that folder finishes moving in (a kill
before the mark leaves the old set whole and the staging folder is dropped).

Temporary names carry their writer's host and process id, ``.<name>.tmp@<host>@<pid>@<random>``
(``.old@`` for an old folder set aside, ``.set@`` for a staged set). Every write first removes the
leftovers of its own name whose process is gone, and never one of a live process (another queued job's);
leftovers of another host are kept, since whether their writer lives cannot be told from here. Names
without an owner (``.<name>.tmp-<random>``) come from writers older than this scheme and count as stale.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msdet.errors import UserError

#: ``.<name>.<kind>@<host>@<pid>@<random>`` or the ownerless ``.<name>.<kind>-<random>``
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|set)(?:@(?P<host>[^@]+)@(?P<pid>\d+)@|-).*$")


class ReplaceRefused(UserError):
    """The path to replace holds something that is not a previous output of the same kind."""


def owner_prefix(name: str, kind: str = "tmp") -> str:
    """The temporary-name prefix for ``name`` written by this process (``kind``: "tmp", "old" or "set")."""
    return f".{name}.{kind}@{socket.gethostname()}@{os.getpid()}@"


def owner_alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that made a temporary name may still be using it (other hosts: assumed so)."""
    if host is None or pid is None:
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporary names in ``directory`` (those of ``name`` only, if given) whose writer is gone.

    An old folder set aside whose replacement never arrived is renamed back first, and a staged set marked
    complete is moved in first. Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        m = _TEMP.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        if owner_alive(m["host"], int(m["pid"]) if m["pid"] else None):
            continue
        final, inner = directory / m["name"], entry / m["name"]
        if m["kind"] == "old" and (inner.exists() or inner.is_symlink()) and not (final.exists() or final.is_symlink()):
            os.replace(inner, final)
        if m["kind"] == "set" and (entry / SET_COMPLETE).is_file():
            _move_set(entry, directory)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_replaceable(final: str | Path, marker: str | tuple[str, ...]) -> None:
    """Refuse to replace ``final`` unless it is absent, an empty folder, or a folder holding ``marker`` (the
    file every previous output of this kind has; with several, one of them)."""
    final, markers = Path(final), (marker,) if isinstance(marker, str) else marker
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_dir() and not final.is_symlink() and (any((final / m).is_file() for m in markers)
                                                      or not any(final.iterdir())):
        return
    raise ReplaceRefused(f"{final}: exists and is not a previous output of this kind (no {' or '.join(markers)} in "
                         f"it); move it away or delete it")


@contextlib.contextmanager
def atomic_path(final: str | Path, replaces: str | tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that replaces ``final`` only on success.

    ``replaces``: a file name every previous output at ``final`` holds (or names, one of which it holds);
    anything else there is refused
    (:class:`ReplaceRefused`) before a byte is written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, final.name)
    if replaces is not None:
        check_replaceable(final, replaces)
    tmp_dir = Path(tempfile.mkdtemp(prefix=owner_prefix(final.name), dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        yield tmp
        replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def replace(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``. A file over a file is one rename; when either is a folder, the old one is
    renamed aside, the new one in, and only then the old one deleted (put back if the second rename fails)."""
    old_there = final.exists() or final.is_symlink()
    if not old_there or not (new.is_dir() or (final.is_dir() and not final.is_symlink())):
        os.replace(new, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=owner_prefix(final.name, "old"), dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside / final.name, final)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


#: written last into a staged set: from then on the set is moved in, even by the next run
SET_COMPLETE = ".complete"


@contextlib.contextmanager
def atomic_files(directory: str | Path, name: str) -> Iterator[Path]:
    """Yield a staging folder whose files replace their namesakes in ``directory`` as one set: after a kill,
    ``directory`` holds the old set or (once :func:`remove_stale` has run there) the new one, never a mix."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory, name)
    stage = Path(tempfile.mkdtemp(prefix=owner_prefix(name, "set"), dir=directory))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (stage / SET_COMPLETE).write_text("")
    # a failure from here on leaves the complete set staged, for the next remove_stale to finish
    _move_set(stage, directory)
    shutil.rmtree(stage)


def _move_set(stage: Path, directory: Path) -> None:
    for entry in sorted(stage.iterdir()):
        if entry.name != SET_COMPLETE:
            os.replace(entry, directory / entry.name)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
