"""What a stage must not do inside a queued DVC experiment (``dvc queue start``, ``dvc exp run --temp``).

Each queued experiment runs in its own temporary copy of the project, ``.dvc/tmp/exps/<tmp>/``, and with
``-j N`` several run at once. Outputs inside the copy are private to it; an output path outside it (an
absolute ``data.root``, say) is the same folder for every job, written by all of them at once, and DVC 3 does
not save a cached output outside the repository anyway. Such paths are refused in a queued run, before
anything is written.
"""
from __future__ import annotations

from pathlib import Path

from msdet.errors import UserError

#: where DVC makes the temporary copies of queued experiments, relative to the repository
QUEUED_COPIES = (".dvc", "tmp", "exps")


def in_queued_copy(cwd: str | Path | None = None) -> bool:
    """Whether ``cwd`` (default: the working directory) is inside a queued experiment's temporary copy."""
    parts = Path(cwd or Path.cwd()).resolve().parts
    n = len(QUEUED_COPIES)
    return any(parts[i:i + n] == QUEUED_COPIES for i in range(len(parts) - n + 1))


def check_private_output(params_file: str | Path, key: str, path: str | Path) -> None:
    """Refuse output ``path`` (param ``key``) when it lies outside a queued experiment's copy."""
    cwd = Path.cwd().resolve()
    if not in_queued_copy(cwd):
        return
    target = (cwd / path).resolve()
    if target != cwd and cwd not in target.parents:
        raise UserError(f"{params_file}: {key} {str(path)!r} is outside this queued experiment's copy ({cwd}); "
                        f"jobs of the queue would write it at the same time: use a path inside the project")
