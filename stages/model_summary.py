"""``make model-summary``: one JSON object, model name -> parameter counts and GFLOPs at the COCO setting."""
from __future__ import annotations

import argparse
import json
import sys

from msdet.cli import run
from msdet.config import load_params
from msdet.summary import model_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overlay", default="params_coco.yaml", help="profile merged on top (the official sizes)")
    args = ap.parse_args(argv)
    print(json.dumps(model_summary(load_params(args.params, overlay=args.overlay)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
