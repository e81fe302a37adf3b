"""Replacing outputs: the old tree survives a kill at any moment, foreign folders are refused, a checkpoint
set moves in whole, and temporary folders are removed once (and only once) their process is gone."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from msdet import atomic
from msdet.atomic import ReplaceRefused, atomic_files, atomic_path, remove_stale
from msdet.cli import run
from tests.helpers import ROOT

#: runs ``atomic_path`` (or ``atomic_files``) on argv[1] with a SIGKILL at os.replace call number argv[2]
DYING_WRITER = """
import os, signal, sys
from pathlib import Path
from msdet import atomic

real, calls = os.replace, []

def dying_replace(src, dst):
    calls.append(dst)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)

os.replace = dying_replace
target = Path(sys.argv[1])
if sys.argv[3] == "folder":
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
else:
    with atomic.atomic_files(target, "checkpoints") as stage:
        for name in ("best.ckpt", "ema.ckpt", "final.ckpt"):
            (stage / name).write_text("new " + name)
"""


def dying_writer(tmp_path: Path, target: Path, kill_at: int, what: str) -> int:
    script = tmp_path / "dying_writer.py"
    script.write_text(DYING_WRITER)
    return subprocess.run([sys.executable, str(script), str(target), str(kill_at), what], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def old_tree(path: Path) -> dict[str, str]:
    (path / "sub").mkdir(parents=True)
    (path / "old.txt").write_text("old")
    (path / "sub" / "deep.txt").write_text("deep")
    return tree(path)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.mark.parametrize("kill_at", [1, 2])
def test_kill_while_replacing_a_folder_keeps_the_old_tree(tmp_path, kill_at):
    """Call 1 renames the old folder aside, call 2 the new one in: killed before either, the old tree is
    under its name again once the next write of that path (here its cleanup step) has run."""
    out = tmp_path / "out"
    before = old_tree(out)
    assert dying_writer(tmp_path, out, kill_at, "folder") == -9
    remove_stale(tmp_path, "out")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dying_writer.py", "out"]


def test_failed_rename_in_puts_the_old_tree_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = old_tree(out)
    real, calls = os.replace, []

    def failing_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_second)
    with pytest.raises(OSError, match="disk gone"), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_old_folder_is_deleted_only_after_the_new_one_is_in(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old_tree(out)
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append(tree(out))  # what the final name holds while anything is deleted
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert seen and all(s == {"new.txt": "new"} for s in seen)


def test_a_folder_that_is_not_a_previous_output_is_refused(tmp_path):
    out = tmp_path / "photos"
    before = old_tree(out)
    with pytest.raises(ReplaceRefused, match=r"photos: exists and is not a previous output of this kind "
                                             r"\(no export_report.json in it\)"), \
            atomic_path(out, replaces="export_report.json") as tmp:
        tmp.write_text("never reached")
    assert tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["photos"]
    (out / "export_report.json").write_text("{}")  # a previous export: replaced
    with atomic_path(out, replaces="export_report.json") as tmp:
        tmp.mkdir()
        (tmp / "export_report.json").write_text("new")
    assert tree(out) == {"export_report.json": "new"}


def test_export_out_refuses_a_foreign_folder_in_one_line(tmp_path, capsys):
    from stages.export import main

    out = tmp_path / "mine"
    before = old_tree(out)
    rc = run(main, ["--model", "nanodet", "--params", str(ROOT / "params.yaml"), "--ckpt", str(tmp_path / "x.ckpt"),
                    "--num-classes", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"error: {out}: exists and is not a previous output of this kind (no " \
                              f"export_report.json in it); move it away or delete it\n"
    assert tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(tmp_path):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        names = {
            "dead": f".mindrecord.tmp@{host}@{dead_pid()}@a",
            "ownerless": ".mindrecord.tmp-b",
            "live": f".mindrecord.tmp@{host}@{live.pid}@c",
            "other_host": f".mindrecord.tmp@not-{host}@{dead_pid()}@d",
            "other_name": f".coco.tmp@{host}@{dead_pid()}@e",
        }
        for name in names.values():
            (tmp_path / name / "mindrecord").mkdir(parents=True)
            (tmp_path / name / "mindrecord" / "shard0").write_bytes(b"\0" * 1024)
        with atomic_path(tmp_path / "mindrecord") as tmp:
            tmp.mkdir()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["mindrecord", names["live"], names["other_host"], names["other_name"]])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("kill_at,expect", [(1, "old"), (2, "mixed"), (3, "mixed")])
def test_a_checkpoint_set_killed_while_moving_in_is_finished_whole(tmp_path, kill_at, expect):
    """The set's files move in one rename each (calls 1-3): a kill between them leaves a mix only until the
    next cleanup of the folder, which moves the rest of the complete set in."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("best.ckpt", "ema.ckpt", "final.ckpt"):
        (models / name).write_text("old " + name)
    assert dying_writer(tmp_path, models, kill_at, "set") == -9
    now = {p.name: p.read_text().split()[0] for p in models.glob("*.ckpt")}
    assert sorted(set(now.values())) == (["new", "old"] if expect == "mixed" else ["old"])
    remove_stale(models)
    assert tree(models) == {n: "new " + n for n in ("best.ckpt", "ema.ckpt", "final.ckpt")}


def test_a_set_that_fails_before_it_is_complete_leaves_the_old_one(tmp_path):
    for name in ("ema.ckpt", "final.ckpt"):
        (tmp_path / name).write_text("old")
    with pytest.raises(RuntimeError), atomic_files(tmp_path, "checkpoints") as stage:
        (stage / "ema.ckpt").write_text("new")
        raise RuntimeError("killed while writing final.ckpt")
    assert tree(tmp_path) == {"ema.ckpt": "old", "final.ckpt": "old"}
