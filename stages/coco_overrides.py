"""Print an overlay params file (default params_coco.yaml) as ``-S key=value`` options for ``dvc exp run``.

The overlay is validated on top of params.yaml first, so a typo fails here, not hours into a run.
"""
from __future__ import annotations

import sys

import yaml

from msdet.cli import run
from msdet.config import flatten, load_params, read_yaml


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overlay_path = argv[0] if argv else "params_coco.yaml"
    load_params("params.yaml", overlay=overlay_path)
    overlay = read_yaml(overlay_path)
    print(" ".join(f"-S {key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                   for key, value in flatten(overlay)))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
