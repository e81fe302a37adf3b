"""DVC stage download: materialise the COCO-format tree at ``data.root``.

``data.source``: ``synthetic`` generates the embedded set; ``coco2017`` downloads COCO 2017 (resumable);
``own`` converts the data set ``data.own`` describes (COCO JSON, VOC, YOLO) into a COCO tree; anything else is
a local COCO tree, validated and used in place through a pointer file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.cli import run
from msdet.config import load_params
from msdet.data.coco import POINTER_FILE, CocoFormatError, resolve_tree, validate_tree, write_pointer
from msdet.data.synthetic import generate_synthetic
from msdet.queue import check_private_output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    root, source = Path(params.data.root), params.data.source
    check_private_output(args.params, "data.root", root)
    what = f"own ({params.data.own.format})" if source == "own" else source
    done = ""
    if source == "coco2017":
        from msdet.data.download import fetch_coco2017

        (root / POINTER_FILE).unlink(missing_ok=True)  # a stale pointer would win over the download
        fetch_coco2017(root, params.download)
    else:
        # Both other sources replace data.root as a whole: never at the cost of a COCO download.
        kept = [p.name for p in (root / "train2017", root / "val2017", root / "downloads") if p.exists()]
        if kept:
            print(f"error: {root} holds a COCO 2017 download ({', '.join(kept)}); set data.root to another "
                  f"folder for data.source={source!r}, or move it away", file=sys.stderr)
            return 1
        if source == "synthetic":
            generate_synthetic(root, params.data.synthetic)
        elif source == "own":
            from msdet.data.own import convert_own

            try:
                counts = convert_own(params.data.own, root)["counts"]
            except CocoFormatError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            changed = {k: counts[k] for k in ("dropped_degenerate", "dropped_outside_image", "clipped_boxes",
                                              "size_mismatch", "reencoded", "downscaled") if counts[k]}
            done = "; " + ", ".join(f"{k} {v}" for k, v in changed.items()) if changed else ""
        else:
            write_pointer(root, source)
            what = f"{source} (used in place)"
    tree = resolve_tree(root)
    summary = validate_tree(tree)
    print(f"[download] {what} -> {root}: "
          + ", ".join(f"{s} {v['images']} images / {v['annotations']} annotations" for s, v in summary.items()) + done)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
