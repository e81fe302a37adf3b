"""``make model-summary``: one JSON object, model name -> parameter counts and GFLOPs at the COCO setting."""
from __future__ import annotations

import json
import sys

from msdet.cli import run
from msdet.summary import model_summary


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(model_summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
