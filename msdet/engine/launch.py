"""Start data-parallel training on MindSpore's own launcher, ``msrun``, and report a failed rank by its log.

msrun spawns one scheduler and ``workers`` worker processes on this host; when any worker dies it stops the
job and exits non-zero. We add: a free scheduler port, an overall timeout, and a message naming the log of
the rank that failed first. On Ascend a rank-table file (the seed scripts' HCCL setup) is passed through.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


class DistributedJobFailed(RuntimeError):
    """A worker of the distributed job exited with an error (or the job timed out)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_command(script: str, script_args: Sequence[str], workers: int, log_dir: str | Path,
                  master_port: int | None = None, rank_table: str | None = None) -> list[str]:
    msrun = shutil.which("msrun") or str(Path(sys.executable).with_name("msrun"))
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={master_port or free_port()}", f"--log_dir={log_dir}", "--join=True",
           "--cluster_time_out=300"]
    if rank_table:
        cmd.append(f"--rank_table_file={rank_table}")
    return cmd + [script, *script_args]


def failed_rank_logs(log_dir: str | Path) -> list[Path]:
    """Worker logs that end in a Python traceback or a MindSpore error, first-failing rank first."""
    bad = []
    for log in sorted(Path(log_dir).glob("worker_*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        text = log.read_text(errors="replace")
        if "Traceback (most recent call last)" in text or re.search(r"^\[ERROR\]", text, re.M):
            bad.append(log)
    return bad


def last_error_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception|Diverged)\b", ln) or "Error:" in ln]
    return (errors or lines or [""])[-1].strip()[:300]


def run_distributed(script: str, script_args: Sequence[str], workers: int, log_dir: str | Path,
                    timeout_s: float | None = None, rank_table: str | None = None,
                    env: dict | None = None) -> None:
    """Run ``script`` on ``workers`` ranks; raise DistributedJobFailed naming the failing rank's log."""
    log_dir = Path(log_dir)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    run_env = dict(os.environ if env is None else env)
    # workers are started as plain `python`: make it this interpreter
    run_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + run_env.get("PATH", "")
    run_env.setdefault("GLOG_v", "3")
    # msrun starts the script as a file: resolve its imports from the working directory, as `python -m`
    # does (this checkout's package, not another one installed in the environment)
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), run_env.get("PYTHONPATH", "")) if p)
    cmd = msrun_command(script, script_args, workers, log_dir, rank_table=rank_table)
    with open(log_dir / "msrun.out", "w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=run_env, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise DistributedJobFailed(f"distributed job timed out after {timeout_s} s; logs in {log_dir}") from exc
    if proc.returncode != 0:
        bad = failed_rank_logs(log_dir)
        if bad:
            rank = bad[0].stem.rsplit("_", 1)[-1]
            raise DistributedJobFailed(f"rank {rank} failed: see {bad[0]} ({last_error_line(bad[0])})")
        raise DistributedJobFailed(f"msrun exited with code {proc.returncode}; see {log_dir}/msrun.out")
