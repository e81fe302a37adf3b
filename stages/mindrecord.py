"""DVC stage mindrecord: convert the COCO tree at ``data.root`` to sharded MindRecord + metrics/data.json."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.atomic import write_json
from msdet.cli import run
from msdet.config import load_params
from msdet.data.coco import read_conversion_report, resolve_tree
from msdet.data.mindrecord import convert_tree
from msdet.queue import check_private_output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/data.json")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    check_private_output(args.params, "mindrecord.out_dir", params.mindrecord.out_dir)
    tree = resolve_tree(params.data.root)
    caps = {m: getattr(params, m).train.max_gt_boxes for m in ("d0", "nanodet")}
    stats = convert_tree(tree, Path(params.mindrecord.out_dir), params.mindrecord, gt_caps=caps)
    conversion = read_conversion_report(tree)
    if conversion is not None:
        stats["conversion"] = conversion["counts"]
    write_json(args.metrics, stats)
    for split in ("train", "val"):
        s = stats[split]
        print(f"[mindrecord] {split}: {s['images']} images, {s['boxes']} boxes, dropped {s['dropped']}, "
              f"clipped {s['clipped_boxes']}, skipped {s['skipped_images']} bad images")
    for model in caps:
        pad = stats["gt_padding"][model]
        print(f"[mindrecord] {model}: ground truth padded to {pad['max_gt_boxes']} boxes per image; "
              f"{pad['boxes_over_cap']} boxes on {pad['images_over_cap']} images beyond it are dropped")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
