"""Photos as cameras and annotation tools leave them -> image files the pipeline reads the same way everywhere.

The training pipeline decodes stored bytes with ``cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION`` and
checks the size against the record, so a converted image must be, as stored, exactly the picture its boxes
were drawn on. :func:`probe` reads only the header (Pillow opens lazily; the PNG bit depth comes from IHDR)
and :func:`plan_image` decides, per file, whether its bytes can be copied or must be re-encoded:

- EXIF orientation (``exif_orientation: apply``): the rotation/flip is baked into the pixels and the tag
  dropped; the size is the displayed one. ``ignore`` keeps the stored grid (the tag is then never read);
- CMYK JPEG, grayscale+alpha, RGBA, palette, 1-bit and 16-bit PNG -> 8-bit BGR, as ``cv2.IMREAD_COLOR``
  gives it (alpha dropped, 16 bit scaled by 1/256): what cv2-based trainers (NanoDet, mmdet) feed the net;
- formats other than JPEG/PNG (BMP, TIFF, WebP) -> PNG;
- a longer side above ``max_image_side`` -> downscaled (INTER_AREA). JPEGs are decoded at 1/2, 1/4 or 1/8
  resolution first (``cv2.IMREAD_REDUCED_COLOR_*``, DCT scaling), so a 6000x4000 photo never occupies its
  full 72 MB; the boxes are scaled by the same factors.

Re-encoded JPEGs use quality 95; everything else is lossless.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageFileError(ValueError):
    """An image file is missing or unreadable; the message names it."""


@dataclass(frozen=True)
class Probe:
    """What the header says: stored size, EXIF orientation (1 = none), format, Pillow mode, bits per sample."""

    width: int
    height: int
    orientation: int
    format: str
    mode: str
    bit_depth: int


@dataclass(frozen=True)
class ImagePlan:
    """How one image is converted: copied as is, or decoded with ``flags`` and re-encoded to ``size``."""

    width: int              # of the picture the boxes refer to (displayed, or stored with ``ignore``)
    height: int
    out_width: int          # after downscaling
    out_height: int
    reencode: bool
    reasons: tuple[str, ...]
    flags: int              # cv2.imdecode flags when re-encoding
    suffix: str             # of the written file


def probe(path: str | Path) -> Probe:
    """Header of ``path`` (no pixel data is decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            fmt, mode = str(im.format), im.mode
            width, height = im.size
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1)) if fmt in ("JPEG", "MPO", "PNG", "WEBP",
                                                                                   "TIFF") else 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(f"{path}: not a readable image ({exc})") from exc
    depth = 8
    if fmt == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)
        depth = head[24] if len(head) == 26 else 8
    return Probe(int(width), int(height), orientation if 1 <= orientation <= 8 else 1, fmt, mode, int(depth))


def plan_image(p: Probe, exif_orientation: str, max_image_side: int) -> ImagePlan:
    """Decide copy or re-encode (see the module docstring); sizes are (width, height) in pixels."""
    reasons = []
    width, height = p.width, p.height
    rotate = exif_orientation == "apply" and p.orientation != 1
    if rotate:
        reasons.append("exif_rotated")
        if p.orientation in _TRANSPOSED:
            width, height = height, width
    jpeg = p.format in ("JPEG", "MPO")
    if not jpeg and p.format != "PNG":
        reasons.append("other_format")
    elif p.mode not in ("L", "RGB") or p.bit_depth != 8:
        reasons.append("pixel_format")
    factor = 1.0
    if max_image_side and max(width, height) > max_image_side:
        reasons.append("downscaled")
        factor = max_image_side / max(width, height)
    out_w, out_h = (max(1, round(width * factor)), max(1, round(height * factor))) if factor < 1 else (width, height)
    reduce = 1
    while jpeg and reduce < 8 and max(width, height) / (2 * reduce) >= max(out_w, out_h):
        reduce *= 2
    flags = (_REDUCED[reduce] or cv2.IMREAD_COLOR) | (0 if rotate else cv2.IMREAD_IGNORE_ORIENTATION)
    suffix = ".jpg" if jpeg else ".png"
    return ImagePlan(width, height, out_w, out_h, bool(reasons), tuple(reasons), flags, suffix)


def write_image(src: str | Path, dst: str | Path, plan: ImagePlan) -> None:
    """Copy ``src`` to ``dst``, or decode, orient, downscale and re-encode it as ``plan`` says."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not plan.reencode:
        shutil.copyfile(src, dst)
        return
    data = np.fromfile(str(src), dtype=np.uint8)
    image = cv2.imdecode(data, plan.flags) if data.size else None
    if image is None:
        raise ImageFileError(f"{src}: cannot be decoded as an image")
    expect = (plan.out_height, plan.out_width)
    if image.shape[:2] != expect:
        if plan.out_width == plan.width and plan.out_height == plan.height:
            raise ImageFileError(f"{src}: decodes to {image.shape[1]}x{image.shape[0]}, its header says "
                                 f"{plan.width}x{plan.height}")
        image = cv2.resize(image, (plan.out_width, plan.out_height), interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if plan.suffix == ".jpg" else []
    ok, buf = cv2.imencode(plan.suffix, image, params)
    if not ok:
        raise ImageFileError(f"{src}: could not be re-encoded as {plan.suffix}")
    buf.tofile(str(dst))


def write_image_task(task: tuple[str, str, ImagePlan]) -> None:
    """:func:`write_image` for ``Pool.imap`` (one tuple argument)."""
    write_image(*task)
