"""Conversion rate of your own data: images/s on generated full-HD JPEGs, YOLO format, through both stages.

    python -m msdet.bench.own_data_rate [--images 1000] [--repeats 3] [--workers 2] [--out DIR]

The download stage's conversion (msdet/data/own.py) in two cases: plain JPEGs (header read, bytes copied) and
the same photos with EXIF orientation 6 (decoded, rotated and re-encoded); then the MindRecord stage
(msdet/data/mindrecord.py: every image decoded and checked, sharded as ``mindrecord`` in the params say) on
the converted tree. Prints JSON: per case the median and spread of images/s over the repeats.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from msdet.bench.stats import summarize
from msdet.config import load_params
from msdet.data.coco import resolve_tree
from msdet.data.mindrecord import convert_tree
from msdet.data.own import convert_own


def make_photos(root: Path, n: int, exif_orientation: int, width: int = 1920, height: int = 1080) -> None:
    """``n`` JPEGs (quality 90) of coloured blocks and rectangles, one YOLO label file each."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    for i in range(n):
        blocks = rng.integers(0, 255, (height // 60 + 1, width // 60 + 1, 3), dtype=np.uint8)
        img = np.ascontiguousarray(blocks.repeat(60, 0).repeat(60, 1)[:height, :width])
        img += rng.integers(0, 16, img.shape, dtype=np.uint8)  # sensor-like noise: realistic file sizes
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90, exif=exif.tobytes())
        (root / "images" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        boxes = rng.uniform(0.1, 0.9, (3, 2))
        (root / "labels" / f"{i:05d}.txt").write_text(
            "".join(f"{k % 2} {x:.6f} {y:.6f} 0.100000 0.150000\n" for k, (x, y) in enumerate(boxes)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--params", default="params.yaml", help="data.own is read from it (format, path set here)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    own, mr_cfg = params.data.own, dataclasses.replace(params.mindrecord, workers=args.workers)
    scratch = Path(args.out or tempfile.mkdtemp(prefix="own-rate-"))
    results = {}
    try:
        for case, orientation in (("copied", 1), ("exif_rotated_reencoded", 6)):
            src = scratch / case
            make_photos(src, args.images, orientation)
            cfg = dataclasses.replace(own, format="yolo", path=str(src), names=["a", "b"], workers=args.workers)
            rates, report = [], None
            for r in range(args.repeats):
                t0 = time.perf_counter()
                report = convert_own(dataclasses.replace(cfg, split_seed=r), scratch / f"{case}_out")
                rates.append(args.images / (time.perf_counter() - t0))
            mb = sum(p.stat().st_size for p in (src / "images").iterdir()) / args.images / 2**20
            results[case] = {"images_per_s": summarize(rates), "mean_file_mb": round(mb, 3),
                             "reencoded": report["counts"]["reencoded"], "copied": report["counts"]["copied"]}
            if case == "copied":
                rates = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    convert_tree(resolve_tree(scratch / f"{case}_out"), scratch / "mindrecord", mr_cfg)
                    rates.append(args.images / (time.perf_counter() - t0))
                results["mindrecord_stage"] = {"images_per_s": summarize(rates), "train_shards": mr_cfg.train_shards,
                                               "val_shards": mr_cfg.val_shards}
                shutil.rmtree(scratch / "mindrecord")
            shutil.rmtree(src)
            shutil.rmtree(scratch / f"{case}_out")
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"images": args.images, "size": "1920x1080", "workers": args.workers, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
