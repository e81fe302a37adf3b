"""DVC stage mindrecord: convert the COCO tree at ``data.root`` to sharded MindRecord + metrics/data.json, the
data statistics under plots/data/ and D0's anchors fitted to the training boxes (into meta.json, with their
best-possible recall in metrics/data.json)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.atomic import write_json
from msdet.cli import run
from msdet.config import load_params
from msdet.data.coco import SPLITS, read_conversion_report, resolve_tree
from msdet.data.meta import read_meta, write_meta
from msdet.data.mindrecord import convert_tree
from msdet.data.stats import d0_anchor_fit, health_warning, read_boxes, split_tables, write_plot_tables
from msdet.queue import check_private_output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/data.json")
    ap.add_argument("--plots", default="plots/data")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    check_private_output(args.params, "mindrecord.out_dir", params.mindrecord.out_dir)
    tree = resolve_tree(params.data.root)
    caps = {m: getattr(params, m).train.max_gt_boxes for m in ("d0", "nanodet")}
    out_dir = Path(params.mindrecord.out_dir)
    stats = convert_tree(tree, out_dir, params.mindrecord, gt_caps=caps)
    conversion = read_conversion_report(tree)
    if conversion is not None:
        stats["conversion"] = conversion["counts"]
    meta = read_meta(out_dir)
    names = [c["name"] for c in meta["categories"]]
    boxes = {s: read_boxes(out_dir, s) for s in SPLITS}
    write_plot_tables(args.plots, {s: split_tables(boxes[s], names, stats[s]) for s in SPLITS})
    stats["d0_anchors"], fitted = d0_anchor_fit(boxes["train"], params.d0)
    meta["d0_anchors"] = {"input_size": params.d0.input_size, "pos_iou": params.d0.pos_iou, "fit": fitted.as_dict()}
    write_meta(out_dir, meta)
    write_json(args.metrics, stats)
    for split in SPLITS:
        s = stats[split]
        print(f"[mindrecord] {split}: {s['images']} images, {s['boxes']} boxes, dropped {s['dropped']}, "
              f"clipped {s['clipped_boxes']}, skipped {s['skipped_images']} bad images")
    for model in caps:
        pad = stats["gt_padding"][model]
        print(f"[mindrecord] {model}: ground truth padded to {pad['max_gt_boxes']} boxes per image; "
              f"{pad['boxes_over_cap']} boxes on {pad['images_over_cap']} images beyond it are dropped")
    anchors = stats["d0_anchors"]
    ratios = [[round(r, 3) for r in q] for q in anchors["fit"]["ratios"]]
    print(f"[mindrecord] d0 anchors at {anchors['input_size']} px: best-possible recall at IoU {anchors['pos_iou']} "
          f"{anchors['default']['bpr']:.4f} (default), {anchors['fit']['bpr']:.4f} (fit: scale "
          f"{anchors['fit']['anchor_scale']:.3g}, ratios {ratios})")
    warning = health_warning(stats, params.mindrecord.min_class_boxes)
    if warning:
        print(f"warning: [mindrecord] {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
