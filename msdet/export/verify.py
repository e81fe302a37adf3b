"""Does an exported file compute what the in-memory network does? Two comparisons per check image.

**Raw outputs**, per output tensor: ``max |got - ref| <= atol + rtol * max |ref|``. numpy's ``allclose`` rule,
with the relative term taken at the tensor's scale instead of per element: two runtimes' float32 kernels
sum in different orders, so an element's error is a fraction of the magnitudes summed into it (of the
tensor's scale), not of its own value. A per-element rule rejects a small value computed next to large
ones (measured: -0.1650 vs -0.1658 in a D0 box tensor reaching 31.6, 2e-5 of its scale). A nonlinearity
after the sum passes the error on: D0's class probabilities (scale 1) differed by 1.5e-4 where their logits
reached 20, hence an rtol of 1e-3 in params.yaml.

**Decoded detections**: both output sets go through the detector's ``decode`` and the evaluation's
``select_detections`` (score threshold, top-k, class-wise NMS, max detections), in network-input pixels.
Detections are paired by class and corners within ``box_atol_px`` pixels; a pair must agree within
``score_atol`` in score. A detection present on one side only is a mismatch unless it sits on a decision
boundary a last-bit difference can flip: its score within ``score_atol`` of the score threshold or of a top-k /
max-detections cut, a box clipped to within ``box_atol_px`` of no area (dropped when empty), or a same-class
box on the other side overlapping it by about the NMS threshold, or by more with a tied score (NMS visit
order), or one that is itself such a flip (the next link of a chain).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msdet.evaluation.postprocess import select_detections
from msdet.ops.iou import box_iou_np

#: IoUs within this of the NMS threshold may flip between runtimes (moving one side of a 20 px box by
#: 0.1 px changes its IoU by ~0.005)
IOU_BAND = 0.01
#: a box within this of another (corners, px) is the same detection moved, not a tied rival NMS kept instead
SAME_BOX_PX = 1.0


@dataclass(frozen=True)
class Tolerances:
    """What an exported file may differ by (params.yaml: export.atol, rtol, box_atol_px, score_atol)."""

    atol: float
    rtol: float
    box_atol_px: float
    score_atol: float


@dataclass(frozen=True)
class Postprocess:
    """The evaluation's post-processing settings (``eval`` in params.yaml), for the decoded comparison."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    pre_nms_top_k: int


@dataclass
class Verdict:
    """Outcome of comparing one exported file with the network on every check image."""

    problems: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    decoded: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------------------
# raw outputs


def compare_raw(ref: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]], names: Sequence[str],
                tol: Tolerances) -> tuple[dict[str, Any], list[str]]:
    """Per output tensor over all check images: max |got - ref|, max |ref| (the scale) and their ratio;
    ``worst_fraction_of_tolerance`` is the largest max|got - ref| / (atol + rtol * max|ref|) (pass: <= 1)."""
    problems: list[str] = []
    per_output = {n: {"max_abs_diff": 0.0, "scale": 0.0, "max_diff_over_scale": 0.0} for n in names}
    worst = 0.0
    for i, (r_out, g_out) in enumerate(zip(ref, got)):
        if len(r_out) != len(g_out):
            return {}, [f"gives {len(g_out)} outputs, the network {len(r_out)} (check image {i})"]
        for name, a, b in zip(names, r_out, g_out):
            if a.shape != b.shape:
                return {}, [f"output '{name}' has shape {b.shape}, the network's {a.shape} (check image {i})"]
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if not np.all(np.isfinite(b64) == np.isfinite(a64)):
                return {}, [f"output '{name}' has inf/NaN where the network has none, or the reverse "
                            f"(check image {i})"]
            finite = np.isfinite(a64)
            diff = float(np.abs(a64 - b64)[finite].max(initial=0.0))
            scale = float(np.abs(a64)[finite].max(initial=0.0))
            allowed = tol.atol + tol.rtol * scale
            ratio = diff / allowed if allowed > 0 else (0.0 if diff == 0 else float("inf"))
            entry = per_output[name]
            entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
            entry["scale"] = max(entry["scale"], scale)
            entry["max_diff_over_scale"] = max(entry["max_diff_over_scale"], diff / scale if scale > 0 else 0.0)
            if ratio > worst:
                worst = ratio
            if ratio > 1.0 and not any(p.startswith(f"output '{name}'") for p in problems):
                problems.append(f"output '{name}' differs by up to {diff:.3g} at scale {scale:.3g} "
                                f"(allowed {tol.atol:g} + {tol.rtol:g} x scale = {allowed:.3g}; check image {i})")
    raw = {"max_abs_diff": max(e["max_abs_diff"] for e in per_output.values()),
           "max_diff_over_scale": max(e["max_diff_over_scale"] for e in per_output.values()),
           "worst_fraction_of_tolerance": worst, "outputs": per_output}
    return raw, problems


# ----------------------------------------------------------------------------------------------------
# decoded detections


@dataclass(frozen=True)
class Detections:
    """One image's detections and the scores at which a candidate falls in or out."""

    boxes: np.ndarray  # [K, 4] input pixels
    scores: np.ndarray  # [K]
    labels: np.ndarray  # [K]
    cuts: tuple[float, ...]  # scores at which a candidate is in or out (threshold, top-k, max detections)


def detections(detector: Any, outputs: Sequence[np.ndarray], post: Postprocess) -> Detections:
    """One image's outputs -> its detections in input pixels, as evaluation computes them."""
    size = float(detector.input_size)
    boxes, scores = detector.decode([np.asarray(o) for o in outputs])
    det_boxes, det_scores, det_labels = select_detections(
        boxes[0], scores[0], np.ones(2, np.float32), np.array([size, size], np.float32),
        score_threshold=post.score_threshold, iou_threshold=post.iou_threshold,
        max_detections=post.max_detections, pre_nms_top_k=post.pre_nms_top_k)
    return Detections(det_boxes, det_scores, det_labels, reference_cuts(scores[0], det_scores, post))


def reference_cuts(scores: np.ndarray, det_scores: np.ndarray, post: Postprocess) -> tuple[float, ...]:
    """Scores at which a candidate falls in or out of one image's detections: the score threshold, the
    ``pre_nms_top_k``-th candidate score, the last detection's when ``max_detections`` were kept.
    scores [A, C] (decoded), det_scores [K] (the detections kept from them)."""
    cuts = [post.score_threshold]
    candidates = np.sort(scores[scores > post.score_threshold])[::-1]
    if candidates.size > post.pre_nms_top_k:
        cuts.append(float(candidates[post.pre_nms_top_k - 1]))
    if det_scores.size == post.max_detections:
        cuts.append(float(det_scores[-1]))
    return tuple(cuts)


def _pair(a: Detections, b: Detections, tol: Tolerances) -> list[tuple[int, int]]:
    """One-to-one pairs (index in a, index in b) of same-class detections whose corners agree within
    ``box_atol_px``, closest first (so a twin is never taken by its neighbour one anchor away)."""
    if not len(a.scores) or not len(b.scores):
        return []
    dist = np.abs(a.boxes[:, None, :] - b.boxes[None, :, :]).max(axis=-1)
    dist = np.where(a.labels[:, None] == b.labels[None, :], dist, np.inf)
    ia, ib = np.nonzero(dist <= tol.box_atol_px)
    pairs, taken_a, taken_b = [], set(), set()
    for k in np.argsort(dist[ia, ib], kind="stable"):
        i, j = int(ia[k]), int(ib[k])
        if i not in taken_a and j not in taken_b:
            pairs.append((i, j))
            taken_a.add(i)
            taken_b.add(j)
    return pairs


def _boundary(k: int, own: Detections, other: Detections, post: Postprocess, tol: Tolerances) -> bool:
    """Whether unpaired detection ``k`` of ``own`` lies on a decision boundary: its score at a cut, its box
    clipped to about no area, or a same-class detection of ``other`` scoring at least as high that overlaps
    it by about the NMS threshold, or by more with a score tied within ``score_atol`` (which of two tied
    boxes NMS keeps is decided by the last bits)."""
    score = float(own.scores[k])
    if any(abs(score - c) <= tol.score_atol for c in own.cuts + other.cuts):
        return True
    if (own.boxes[k, 2:] - own.boxes[k, :2]).min() <= tol.box_atol_px:  # clipped to (almost) no area
        return True
    same = (other.labels == own.labels[k]) & (other.scores >= score - tol.score_atol)
    if not same.any():
        return False
    iou = box_iou_np(own.boxes[k:k + 1], other.boxes)[0]
    # an overlap at the threshold, or a suppressor scoring the same within score_atol (NMS visit order tie)
    rival = np.abs(other.boxes - own.boxes[k]).max(axis=1) > SAME_BOX_PX
    tie = rival & (np.abs(other.scores - score) <= tol.score_atol)
    return bool((same & ((np.abs(iou - post.iou_threshold) <= IOU_BAND) | (tie & (iou > post.iou_threshold)))).any())


def _excused(own: Detections, other: Detections, own_unpaired: np.ndarray, other_unpaired: np.ndarray,
             post: Postprocess, tol: Tolerances) -> np.ndarray:
    """Unpaired detections of ``own`` that a last-bit difference may have flipped: on a decision boundary
    themselves, or suppressed on the other side by a detection that is itself a flipped one (a chain)."""
    direct = np.array([u and _boundary(k, own, other, post, tol) for k, u in enumerate(own_unpaired)], bool)
    flipped_other = np.array([u and _boundary(k, other, own, post, tol) for k, u in enumerate(other_unpaired)],
                             bool)
    out = direct.copy()
    for k in np.flatnonzero(own_unpaired & ~direct):
        same = flipped_other & (other.labels == own.labels[k]) & (other.scores >= own.scores[k] - tol.score_atol)
        if same.any():
            iou = box_iou_np(own.boxes[k:k + 1], other.boxes)[0]
            out[k] = bool((same & (iou > post.iou_threshold - IOU_BAND)).any())
    return out


def compare_detections(ref: Detections, got: Detections, post: Postprocess, tol: Tolerances
                       ) -> tuple[dict[str, Any], list[str]]:
    """Pair the two detection sets of one image; measured differences and the problems found."""
    pairs = _pair(ref, got, tol)
    ia = np.array([p[0] for p in pairs], np.int64)
    ib = np.array([p[1] for p in pairs], np.int64)
    box_diff = np.abs(ref.boxes[ia] - got.boxes[ib]).max(axis=1) if pairs else np.zeros(0)
    score_diff = np.abs(ref.scores[ia] - got.scores[ib]) if pairs else np.zeros(0)
    unpaired_ref = np.ones(len(ref.scores), bool)
    unpaired_ref[ia] = False
    unpaired_got = np.ones(len(got.scores), bool)
    unpaired_got[ib] = False
    borderline, problems = 0, []
    for own, other, own_un, other_un, side in ((ref, got, unpaired_ref, unpaired_got, "the network's"),
                                               (got, ref, unpaired_got, unpaired_ref, "the file's")):
        excused = _excused(own, other, own_un, other_un, post, tol)
        borderline += int(excused.sum())
        for k in np.flatnonzero(own_un & ~excused):
            if len(problems) < 3:
                box = ", ".join(f"{v:.1f}" for v in own.boxes[k])
                same = other.labels == own.labels[k]
                near = np.abs(other.boxes[same] - own.boxes[k]).max(axis=1).min(initial=np.inf)
                problems.append(f"{side} detection class {int(own.labels[k])} score {own.scores[k]:.4f} "
                                f"box [{box}] has no counterpart within {tol.box_atol_px:g} px (nearest "
                                f"same-class box {near:.3g} px away)")
    stats = {"detections": int(len(ref.scores)), "paired": len(pairs), "borderline": borderline,
             "max_box_diff_px": float(box_diff.max(initial=0.0)), "max_score_diff": float(score_diff.max(initial=0.0))}
    if stats["max_score_diff"] > tol.score_atol:
        problems.append(f"paired scores differ by up to {stats['max_score_diff']:.3g} (allowed {tol.score_atol:g})")
    return stats, problems


def verify(detector: Any, ref: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]],
           names: Sequence[str], tol: Tolerances, post: Postprocess) -> Verdict:
    """Compare the network's outputs ``ref`` with an exported file's ``got`` (one tuple per check image)."""
    raw, problems = compare_raw(ref, got, names, tol)
    verdict = Verdict(problems=list(problems), raw=raw)
    if problems and not raw:  # outputs of another count or shape cannot be decoded
        return verdict
    total = {"detections": 0, "paired": 0, "borderline": 0, "max_box_diff_px": 0.0, "max_score_diff": 0.0}
    for i, (r, g) in enumerate(zip(ref, got)):
        stats, image_problems = compare_detections(detections(detector, r, post), detections(detector, g, post),
                                                   post, tol)
        for key in ("detections", "paired", "borderline"):
            total[key] += stats[key]
        for key in ("max_box_diff_px", "max_score_diff"):
            total[key] = max(total[key], stats[key])
        verdict.problems += [f"{p} (check image {i})" for p in image_problems]
    verdict.decoded = total
    return verdict
