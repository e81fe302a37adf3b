"""Start data-parallel training on MindSpore's own launcher, ``msrun``, and report a failed rank by its log.

msrun spawns ``workers`` worker processes on this host (and, on node 0, the scheduler that builds the
cluster); when any of its workers dies it stops them and exits non-zero. Several hosts: run the same command
on each with ``nodes``, its ``node_rank`` and node 0's ``master_addr``/``master_port``; msrun then numbers the
ranks ``node_rank * workers + local index``. With ``--cluster_time_out`` a host whose peers never show up
gives up after that many seconds; a host that dies mid-run stops the others when their scheduler heartbeat
or collective fails (see the README's multi-node section). We add: a free scheduler port on one host, an
overall timeout (``runtime.job_timeout_s``) that stops msrun and its workers, and a message naming the host
and log of the rank that failed first in time. On Ascend a rank-table file (the MindSpore model zoo scripts'
HCCL setup) is passed through.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


class DistributedJobFailed(RuntimeError):
    """A worker of the distributed job exited with an error (or the job timed out)."""


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick); see :func:`reserved_port` for one kept free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: one lock file per scheduler port handed to msrun by an msdet job of this user on this host
PORTS_DIR = Path(tempfile.gettempdir()) / f"msdet-ports-{os.getuid()}"


def lock_port(port: int) -> IO | None:
    """An open file holding an exclusive lock on ``port``'s reservation, or None when a live msdet job holds
    it. The lock goes with the process, so a killed job's reservation frees itself."""
    PORTS_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(PORTS_DIR / str(port), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def reserved_port(attempts: int = 50) -> Iterator[int]:
    """A free local port that no other msdet job on this host gets until the block ends.

    msrun binds the port itself, so it cannot be held open until the hand-over: between the kernel's pick and
    msrun's bind a program other than an msdet job can still take it (msrun then fails and says so).
    """
    for _ in range(attempts):
        port = free_port()
        handle = lock_port(port)
        if handle is not None:
            break
    else:
        raise DistributedJobFailed(f"no free scheduler port after {attempts} tries (reservations in {PORTS_DIR})")
    with handle:
        yield port


@dataclass(frozen=True)
class Cluster:
    """Where this host sits in a multi-node job (the defaults: one host, scheduler on a free local port)."""

    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    #: seconds msrun's processes wait for the whole cluster to form before giving up
    cluster_time_out: int = 300

    def __post_init__(self) -> None:
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is outside 0..{self.nodes - 1}")
        if self.nodes > 1 and self.master_port == 0:
            raise ValueError(f"{self.nodes} nodes need a fixed master_port shared by every host")


def msrun_command(script: str, script_args: Sequence[str], workers: int, log_dir: str | Path,
                  master_port: int | None = None, rank_table: str | None = None,
                  cluster: Cluster | None = None) -> list[str]:
    """The msrun command line for ``workers`` processes on this host (``cluster.nodes`` hosts in all)."""
    cluster = cluster or Cluster()
    msrun = shutil.which("msrun") or str(Path(sys.executable).with_name("msrun"))
    port = master_port or cluster.master_port
    if not port:
        raise ValueError("msrun needs a scheduler port: pass master_port (see reserved_port)")
    cmd = [msrun, f"--worker_num={workers * cluster.nodes}", f"--local_worker_num={workers}",
           f"--master_port={port}", f"--log_dir={log_dir}", "--join=True",
           f"--cluster_time_out={cluster.cluster_time_out}"]
    if cluster.nodes > 1:
        cmd += [f"--node_rank={cluster.node_rank}", f"--master_addr={cluster.master_addr}"]
    if rank_table:
        cmd.append(f"--rank_table_file={rank_table}")
    return cmd + [script, *script_args]


def _rank_of(log: Path) -> int:
    return int(re.sub(r"\D", "", log.stem) or 0)


def failed_rank_logs(log_dir: str | Path) -> list[Path]:
    """Worker logs that end in a Python traceback, a MindSpore error or msdet's one-line ``error: ...`` (a
    UserError, msdet/cli.py), the one that stopped first first (by its last write: a rank that fails makes the
    others fail in their next collective, after it)."""
    bad = []
    for log in Path(log_dir).glob("worker_*.log"):
        text = log.read_text(errors="replace")
        if "Traceback (most recent call last)" in text or re.search(r"^(\[ERROR\]|error: )", text, re.M):
            bad.append(log)
    return sorted(bad, key=lambda p: (p.stat().st_mtime_ns, _rank_of(p)))


def quietest_log(log_dir: str | Path) -> Path | None:
    """The worker log written to last the longest time ago (on a hang: the rank that stopped first)."""
    logs = sorted(Path(log_dir).glob("worker_*.log"), key=lambda p: (p.stat().st_mtime_ns, _rank_of(p)))
    return logs[0] if logs else None


#: what a rank logs when a collective or the scheduler loses a peer that died elsewhere (measured with a
#: SIGKILLed node: the survivors' AllReduce gives up after ~30 s)
LOST_PEER = re.compile(r"Reduce wait receiving|AllReduce\w* launch failed|Failed to connect to the meta server|"
                       r"timed out node|heartbeat", re.I)


def last_error_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(\w*(Error|Exception|Diverged)\b|error: )", ln) or "Error:" in ln]
    return (errors or lines or [""])[-1].strip()[:300]


def run_distributed(script: str, script_args: Sequence[str], workers: int, log_dir: str | Path,
                    timeout_s: float | None = None, rank_table: str | None = None,
                    env: dict | None = None, cluster: Cluster | None = None) -> None:
    """Run ``script`` on ``workers`` ranks of this host; raise DistributedJobFailed naming the host and the
    failing rank's log. ``timeout_s`` (None: no limit): the whole job's wall-clock limit, after which msrun
    and its workers are stopped (a hung collective otherwise waits for the backend's own timeout)."""
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
    where = f"node {cluster.node_rank} ({socket.gethostname()}): " if cluster and cluster.nodes > 1 else ""
    with contextlib.ExitStack() as held:
        port = cluster.master_port if cluster and cluster.master_port else held.enter_context(reserved_port())
        cmd = msrun_command(script, script_args, workers, log_dir, master_port=port, rank_table=rank_table,
                            cluster=cluster)
        returncode = _run_msrun(cmd, log_dir, run_env, timeout_s, where)
    if returncode != 0:
        bad = failed_rank_logs(log_dir)
        if bad:
            rank = bad[0].stem.rsplit("_", 1)[-1]
            lost = " It lost a peer: a rank on another node stopped (that node's launcher names it, unless the " \
                   "node itself died)." if where and LOST_PEER.search(bad[0].read_text(errors="replace")) else ""
            raise DistributedJobFailed(f"{where}rank {rank} failed: see {bad[0]} ({last_error_line(bad[0])}).{lost}")
        raise DistributedJobFailed(f"{where}msrun exited with code {returncode}; see {log_dir}/msrun.out")


#: seconds msrun gets to stop its workers after the job's timeout before it is killed
STOP_GRACE_S = 30.0


def _run_msrun(cmd: list[str], log_dir: Path, env: dict, timeout_s: float | None, where: str) -> int:
    """msrun's exit status. On timeout msrun gets SIGINT, on which it kills its workers (each runs in a
    session of its own, so killing msrun alone would leave them running)."""
    with open(log_dir / "msrun.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    bad, quiet = failed_rank_logs(log_dir), quietest_log(log_dir)
    hint = (f"; rank {_rank_of(bad[0])} failed first: {bad[0]} ({last_error_line(bad[0])})" if bad else
            f"; the log written to last the longest ago: {quiet}" if quiet else "")
    raise DistributedJobFailed(f"{where}distributed job timed out after {timeout_s:g} s (runtime.job_timeout_s)"
                               f"{hint}; logs in {log_dir}")
