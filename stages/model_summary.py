"""``make model-summary``: one JSON object, model name -> parameter counts and GFLOPs at the COCO setting."""
from __future__ import annotations

import json
import sys

from msdet.summary import model_summary


def main() -> int:
    print(json.dumps(model_summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
