"""Official PyTorch weights -> our MindSpore checkpoints: zylo117's EfficientDet-D0 and RangiLyu's NanoDet-Plus-m.

Our cell trees mirror the official module trees, so each detector's ``official_name_map`` pairs every official
state-dict key with one of our parameters. Conversion is strict: every official tensor is used exactly once
(``*.num_batches_tracked``, PyTorch's BatchNorm step counter, has no counterpart), every MindSpore parameter
is filled, and shapes must agree (conv weights are [out, in / groups, kh, kw] in both frameworks, so no
tensor is transposed). Any problem raises :class:`ConversionError` naming the official key, our name and
both shapes. The one tolerated gap is NanoDet's training-only Assign Guidance Module (``aux_fpn.*``,
``aux_head.*``), absent from some releases: it is then freshly initialised and the report says so.

Key layouts accepted (NanoDet's own ``load_model_weight`` rules): a bare state dict; ``module.`` prefixes
(DataParallel) stripped; a Lightning checkpoint's ``avg_model.*`` (the EMA copy, what the official
evaluation and releases use) preferred over its ``model.*``, whose tensors are then ignored.

Class heads: the class count is read from the class head's shape. zylo117's released D0 has 90 classes,
class k being COCO category id k + 1 (the ids COCO 2017 leaves unused are kept as dead classes); NanoDet's
COCO model has the 80 COCO categories in ascending id order. The converted checkpoint records those ids
(``category_ids``) so evaluation can map a 90-class head onto the 80 categories of COCO val
(:func:`category_ids_for`). Alternatively ``categories`` (a MindRecord meta.json's list) restricts the class
head to a data set's categories by id: the rows of the official head for those ids, in the data set's
order, so a checkpoint for COCO's 80 classes keeps every pretrained class weight, evaluates against the
MindRecord as it is, and ``<model>.init`` fine-tunes from it without re-initialising the class head.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import write_json
from msdet.conversion.naming import NUM_BATCHES_TRACKED
from msdet.engine.checkpoint import (
    category_ids_for,  # re-exported: converted checkpoints carry their ids
    sha256_file,
)

MODELS = ("d0", "nanodet")
OFFICIAL_SOURCES = {"d0": "zylo117/Yet-Another-EfficientDet-Pytorch (efficientdet-d0.pth)",
                    "nanodet": "RangiLyu/nanodet (NanoDet-Plus-m .pth or Lightning .ckpt)"}
#: the official class-head tensor whose first dimension gives the number of classes
CLASS_HEAD_KEYS = {"d0": "classifier.header.pointwise_conv.conv.weight", "nanodet": "head.gfl_cls.0.weight"}
#: training-only NanoDet branches that may be missing from a release (then freshly initialised)
OPTIONAL_PREFIXES = {"d0": (), "nanodet": ("aux_fpn.", "aux_head.")}
#: BatchNorm conventions of the official models: (eps, PyTorch momentum); MindSpore's momentum is 1 - that
BN_CONVENTIONS = {"d0": (1e-3, 0.01), "nanodet": (1e-5, 0.1)}
#: GroupNorm eps (NanoDet's aux head; PyTorch's default)
GN_EPS = 1e-5
#: key prefixes stripped from a checkpoint's state dict, in the order they are handled
WRAPPER_PREFIX = "module."
EMA_PREFIX = "avg_model."
MODEL_PREFIX = "model."

#: COCO 2017 category id -> name (the 80 used ids; 1..90 with ten gaps)
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


class ConversionError(ValueError):
    """The official weights do not fit our network (or the file is not the expected model's)."""


@dataclass
class ConversionReport:
    """What a conversion did; stored (as JSON) beside the weights and printed by the stage."""

    model: str
    num_classes: int
    source: str | None = None
    source_sha256: str | None = None
    key_layout: str = "bare state dict"
    official_tensors_used: int = 0
    parameters_filled: int = 0
    parameters_total: int = 0
    num_batches_tracked_skipped: int = 0
    ignored_non_ema_tensors: int = 0
    freshly_initialised: list[str] = field(default_factory=list)
    cast_to_float32: dict[str, int] = field(default_factory=dict)
    normalisation: list[str] = field(default_factory=list)
    category_ids: list[int] | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report; with ``categories`` [{id, name}] when known, so it also serves as ``--meta`` of
        ``stages.infer`` (which reads ``num_classes`` and ``categories``)."""
        out = dataclasses.asdict(self)
        if self.category_ids is not None and self.class_names is not None:
            out["categories"] = [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]
        return out

    def summary(self) -> str:
        lines = [f"[{self.model}] {self.official_tensors_used} official tensors -> {self.parameters_filled} of "
                 f"{self.parameters_total} MindSpore parameters ({self.num_classes} classes; {self.key_layout})",
                 f"[{self.model}] skipped {self.num_batches_tracked_skipped} num_batches_tracked counters"]
        if self.ignored_non_ema_tensors:
            lines.append(f"[{self.model}] ignored {self.ignored_non_ema_tensors} non-EMA 'model.*' tensors "
                         f"(the EMA 'avg_model.*' copy was used)")
        if self.freshly_initialised:
            lines.append(f"[{self.model}] {len(self.freshly_initialised)} parameters freshly initialised (not in "
                         f"the file): {', '.join(self.freshly_initialised[:3])}, ...")
        lines += [f"[{self.model}] {n}" for n in self.normalisation + self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# key layouts


def select_state(state: dict[str, np.ndarray]) -> tuple[dict[str, str], str, int]:
    """Strip ``module.``, prefer ``avg_model.*`` over ``model.*``: (our-layout key -> file key, layout, ignored).

    Returns a mapping so that errors can name the key as it is in the file. Keys outside the chosen
    prefix are kept as they are (and fail later as unused unless they are official keys).
    """
    unwrapped: dict[str, str] = {}
    for key in state:
        bare = key[len(WRAPPER_PREFIX):] if key.startswith(WRAPPER_PREFIX) else key
        if bare in unwrapped:
            raise ConversionError(f"keys '{unwrapped[bare]}' and '{key}' are the same tensor once the "
                                  f"'{WRAPPER_PREFIX}' prefix is stripped")
        unwrapped[bare] = key
    wrapped = sum(k != v for k, v in unwrapped.items())
    layout = [f"'{WRAPPER_PREFIX}' stripped from {wrapped} keys"] if wrapped else []
    ema = {k for k in unwrapped if k.startswith(EMA_PREFIX)}
    live = {k for k in unwrapped if k.startswith(MODEL_PREFIX)}
    chosen, ignored = (EMA_PREFIX, live) if ema else (MODEL_PREFIX, set()) if live else (None, set())
    if chosen is None:
        return unwrapped, "; ".join(layout) or "bare state dict", 0
    out: dict[str, str] = {}
    for key, original in unwrapped.items():
        if key in ignored:
            continue
        name = key[len(chosen):] if key.startswith(chosen) else key
        if name in out:
            raise ConversionError(f"keys '{out[name]}' and '{original}' are the same tensor once the "
                                  f"'{chosen}' prefix is stripped")
        out[name] = original
    layout.append(f"'{chosen}*' used" + (" (the EMA copy)" if chosen == EMA_PREFIX else ""))
    if ignored:
        layout.append(f"{len(ignored)} '{MODEL_PREFIX}*' tensors ignored")
    return out, "; ".join(layout), len(ignored)


# ----------------------------------------------------------------------------------------------------
# model facts


def _model_cfg(model: str, cfg: Any) -> Any:
    """The model config (``params.<model>``) with nothing downloaded or loaded when the network is built."""
    if model not in MODELS:
        raise ConversionError(f"unknown model '{model}': expected one of {', '.join(MODELS)}")
    return dataclasses.replace(cfg, pretrained_backbone="none", init="none")


def infer_num_classes(model: str, state: dict[str, np.ndarray], cfg: Any, source: str = "checkpoint") -> int:
    """The class count of the official class head (``state`` in official keys, prefixes already stripped)."""
    cfg = _model_cfg(model, cfg)
    key = CLASS_HEAD_KEYS[model]
    if key not in state:
        other = next((m for m in MODELS if m != model and CLASS_HEAD_KEYS[m] in state), None)
        hint = f"; it looks like a '{other}' checkpoint" if other else ""
        raise ConversionError(f"{source}: no class head tensor '{key}', not an official {model} state dict{hint}")
    shape = tuple(state[key].shape)
    if model == "d0":
        from msdet.models.efficientdet import D0_SPEC

        anchors = D0_SPEC.num_anchors
        if len(shape) != 4 or shape[0] % anchors:
            raise ConversionError(f"{source}: '{key}' has shape {shape}; its first dimension should be "
                                  f"{anchors} anchors x num_classes")
        return shape[0] // anchors
    reg = 4 * (cfg.reg_max + 1)
    if len(shape) != 4 or shape[0] <= reg:
        raise ConversionError(f"{source}: '{key}' has shape {shape}; its first dimension should be num_classes + "
                              f"4 x (reg_max + 1) = num_classes + {reg} (nanodet.reg_max = {cfg.reg_max})")
    aux_reg = state.get("aux_head.gfl_reg.weight")
    if aux_reg is not None and aux_reg.shape[0] != reg:
        raise ConversionError(f"{source}: 'aux_head.gfl_reg.weight' has {aux_reg.shape[0]} outputs: the file was "
                              f"trained with reg_max {aux_reg.shape[0] // 4 - 1}, nanodet.reg_max is {cfg.reg_max}")
    return shape[0] - reg


def official_categories(model: str, num_classes: int) -> tuple[list[int], list[str]] | None:
    """(COCO category id, name) per class index of the official COCO heads; None for other class counts.

    D0 with 90 classes: zylo117's layout, class k = COCO id k + 1 (ten ids unused by COCO 2017 kept, named
    ``unused_<id>``). 80 classes (NanoDet's COCO model): the 80 COCO ids in ascending order.
    """
    if model == "d0" and num_classes == 90:
        ids = list(range(1, 91))
        return ids, [COCO_CATEGORIES.get(i, f"unused_{i}") for i in ids]
    if model == "nanodet" and num_classes == 80:
        ids = sorted(COCO_CATEGORIES)
        return ids, [COCO_CATEGORIES[i] for i in ids]
    return None


def check_normalisation(model: str, network: Any) -> list[str]:
    """Every BatchNorm (and GroupNorm) cell must use the official eps and momentum; returns the statement."""
    from mindspore import nn

    eps, momentum = BN_CONVENTIONS[model]
    bn, gn, wrong = 0, 0, []
    for path, cell in network.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            bn += 1
            # MindSpore stores 1 - momentum (the PyTorch convention) in the cell
            if not (math.isclose(cell.eps, eps, rel_tol=1e-6)
                    and math.isclose(float(cell.momentum), momentum, rel_tol=1e-6)):
                wrong.append(f"{path}: eps {cell.eps}, momentum {1 - float(cell.momentum):g}")
        elif isinstance(cell, nn.GroupNorm):
            gn += 1
            if not math.isclose(cell.eps, GN_EPS, rel_tol=1e-6):
                wrong.append(f"{path}: GroupNorm eps {cell.eps}")
    if wrong:
        raise ConversionError(f"our {model} network does not use the official normalisation constants (BatchNorm "
                              f"eps {eps}, MindSpore momentum {1 - momentum:g}): {'; '.join(wrong[:3])}")
    out = [f"{bn} BatchNorm2d cells: eps {eps:g}, momentum {1 - momentum:g} (MindSpore) = {momentum:g} "
           f"(PyTorch), as the official model; running_mean/running_var -> moving_mean/moving_variance"]
    if gn:
        out.append(f"{gn} GroupNorm cells: eps {GN_EPS:g}, as the official model")
    return out


# ----------------------------------------------------------------------------------------------------
# conversion


def _build(model: str, cfg: Any, num_classes: int, seed: int) -> tuple[Any, Any]:
    import mindspore as ms

    from msdet.detectors import get_detector

    ms.set_seed(seed)  # only what the file lacks (NanoDet's aux branch) keeps this initialisation
    detector = get_detector(model, cfg, num_classes)
    return detector, detector.build_network()


def restrict_classes(model: str, official: dict[str, np.ndarray], file_ids: Sequence[int],
                     wanted_ids: Sequence[int], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The official state dict with its class head cut down to ``wanted_ids`` (in that order).

    ``file_ids[k]`` is the category id of the file's class k. D0's class conv has anchor-major channels
    (a * C + c); NanoDet's ``head.gfl_cls.*`` hold C class rows then 4 (reg_max + 1) distance rows, and
    ``aux_head.gfl_cls`` C class rows.
    """
    position = {int(i): k for k, i in enumerate(file_ids)}
    absent = [i for i in wanted_ids if int(i) not in position]
    if absent:
        raise ConversionError(f"{source}: category ids {absent[:10]} are not among the {len(file_ids)} classes of "
                              f"the official {model} head (its ids: {min(file_ids)}..{max(file_ids)})")
    if len(set(int(i) for i in wanted_ids)) != len(wanted_ids):
        raise ConversionError(f"{source}: the wanted category ids repeat: {list(wanted_ids)[:20]}")
    rows = np.array([position[int(i)] for i in wanted_ids], dtype=np.int64)
    c = len(file_ids)
    out = dict(official)
    for key, value in official.items():
        if model == "d0" and key.startswith("classifier.header.pointwise_conv.conv."):
            per_anchor = value.reshape((value.shape[0] // c, c) + value.shape[1:])
            out[key] = np.ascontiguousarray(per_anchor[:, rows]).reshape((-1,) + value.shape[1:])
        elif model == "nanodet" and key.startswith("head.gfl_cls."):
            out[key] = np.concatenate([value[rows], value[c:]], axis=0)
        elif model == "nanodet" and key.startswith("aux_head.gfl_cls."):
            out[key] = np.ascontiguousarray(value[rows])
    return out


def convert_state_dict(model: str, state: dict[str, np.ndarray], num_classes: int | None = None, *, cfg: Any,
                       categories: Sequence[dict] | None = None,
                       source: str | None = None, source_sha256: str | None = None,
                       seed: int = 0) -> tuple[Any, ConversionReport]:
    """Official state dict (``{key: array}``, any accepted key layout) -> (our network holding it, report).

    ``categories`` (optional, [{"id", "name"}, ...] as in a MindRecord meta.json) keeps only the class-head
    rows of those category ids, in that order (see :func:`restrict_classes`); the file's ids must be known
    (the official COCO heads). ``num_classes``, when given, must equal the resulting class count (the
    file's, or ``len(categories)``). ``cfg`` is the model config, ``params.<model>`` (only NanoDet's
    ``reg_max`` matters). ``source`` names the file in errors and the report.
    """
    import mindspore as ms

    where = source or "state dict"
    cfg = _model_cfg(model, cfg)
    if model == "d0" and cfg.anchors != "default":
        raise ConversionError(f"{where}: the official D0 weights decode against the default anchors, but "
                              f"d0.anchors is {cfg.anchors}; convert with d0.anchors: default")
    keys, layout, ignored = select_state(state)
    official = {k: state[v] for k, v in keys.items()}
    found = infer_num_classes(model, official, cfg, where)
    file_categories = official_categories(model, found)
    classes = found
    if categories is not None:
        if file_categories is None:
            raise ConversionError(f"{where}: the category ids of this {found}-class {model} head are unknown (only "
                                  f"the official COCO heads' are), so it cannot be cut to given categories")
        wanted = [int(c["id"]) for c in categories]
        official = restrict_classes(model, official, file_categories[0], wanted, where)
        classes = len(wanted)
    if num_classes is not None and num_classes != classes:
        raise ConversionError(
            f"{where}: the class head '{CLASS_HEAD_KEYS[model]}' {tuple(state[keys[CLASS_HEAD_KEYS[model]]].shape)} "
            f"has {found} classes" + (f", cut to {classes} categories" if categories is not None else "")
            + f", not {num_classes}; to fine-tune on other classes convert it as it is (or cut it to your data "
            f"set's categories) and start from it with {model}.init (a class head of another shape is then "
            f"re-initialised)")
    detector, network = _build(model, cfg, classes, seed)
    name_map = detector.official_name_map(network)
    params = {p.name: p for p in network.get_parameters()}
    report = ConversionReport(model=model, num_classes=classes, source=source, source_sha256=source_sha256,
                              key_layout=layout, ignored_non_ema_tensors=ignored, parameters_total=len(params))
    report.normalisation = check_normalisation(model, network)

    unused = [k for k in official if k not in name_map]
    counters = {k for k in unused if k.endswith("." + NUM_BATCHES_TRACKED)
                and k[: -len(NUM_BATCHES_TRACKED)] + "running_mean" in name_map}
    unused = [k for k in unused if k not in counters]
    if unused:
        listed = ", ".join(f"'{keys[k]}' {tuple(official[k].shape)}" for k in unused[:5])
        raise ConversionError(f"{where}: {len(unused)} tensors have no counterpart in our {model} network: {listed}"
                              + (" ..." if len(unused) > 5 else ""))
    report.num_batches_tracked_skipped = len(counters)

    optional = OPTIONAL_PREFIXES[model]
    missing = [k for k in name_map if k not in official]
    if optional and missing and not any(k.startswith(optional) for k in official):
        fresh = [k for k in missing if k.startswith(optional)]
        report.freshly_initialised = sorted(name_map[k] for k in fresh)
        report.notes.append(f"the file has no {'/'.join(p.rstrip('.') for p in optional)} tensors (training-only "
                            f"branch): {len(fresh)} parameters keep a fresh initialisation (seed {seed})")
        missing = [k for k in missing if not k.startswith(optional)]
    if missing:
        listed = ", ".join(f"'{k}' (our '{name_map[k]}' {tuple(params[name_map[k]].shape)})" for k in missing[:5])
        raise ConversionError(f"{where}: {len(missing)} tensors of the official {model} model are missing: {listed}"
                              + (" ..." if len(missing) > 5 else ""))

    filled: dict[str, np.ndarray] = {}
    for key, ours in name_map.items():
        if key not in official:
            continue
        value, param = official[key], params[ours]
        if tuple(value.shape) != tuple(param.shape):
            raise ConversionError(f"{where}: tensor '{keys[key]}' has shape {tuple(value.shape)}, our '{ours}' "
                                  f"needs {tuple(param.shape)}")
        if value.dtype != np.float32:
            if value.dtype.kind != "f":
                raise ConversionError(f"{where}: tensor '{keys[key]}' holds {value.dtype}, not floating point "
                                      f"(for our '{ours}')")
            report.cast_to_float32[str(value.dtype)] = report.cast_to_float32.get(str(value.dtype), 0) + 1
        filled[ours] = np.array(value, dtype=np.float32, order="C")  # ascontiguousarray would make 0-d 1-d
    for ours, value in filled.items():
        params[ours].set_data(ms.Tensor(value))
    report.official_tensors_used = len(filled)
    report.parameters_filled = len(filled)
    if report.cast_to_float32:
        report.notes.append(f"cast to float32: {report.cast_to_float32}")
    if categories is not None:
        report.category_ids = [int(c["id"]) for c in categories]
        report.class_names = [str(c.get("name", f"class_{k}")) for k, c in enumerate(categories)]
        report.notes.append(f"class head cut from the file's {found} classes to the {classes} given categories "
                            f"(rows taken by COCO category id, in the given order)")
    elif file_categories is not None:
        report.category_ids, report.class_names = file_categories
        report.notes.append(
            "class k = COCO category id k + 1 (zylo117; ids unused by COCO 2017 kept as dead classes)"
            if model == "d0" else "classes = the 80 COCO categories in ascending id order (official NanoDet)")
    return network, report


def to_official_state_dict(model: str, network: Any, cfg: Any) -> dict[str, np.ndarray]:
    """Our network -> ``{official key: array}`` (no num_batches_tracked): the inverse of the conversion."""
    from msdet.detectors import get_detector

    detector = get_detector(model, _model_cfg(model, cfg), int(network.num_classes))
    params = {p.name: p for p in network.get_parameters()}
    return {key: params[ours].asnumpy() for key, ours in detector.official_name_map(network).items()}


def checkpoint_metadata(report: ConversionReport) -> dict[str, Any]:
    """What the converted checkpoint carries beside its weights (read back with ``checkpoint_meta``)."""
    meta: dict[str, Any] = {"model": report.model, "num_classes": report.num_classes,
                            "converted_from": OFFICIAL_SOURCES[report.model],
                            "source_file": report.source, "source_sha256": report.source_sha256,
                            "freshly_initialised": report.freshly_initialised}
    if report.category_ids is not None:
        meta["category_ids"] = report.category_ids
        meta["class_names"] = report.class_names
    return meta


def convert_file(model: str, src: str | Path, out: str | Path, num_classes: int | None = None, *, cfg: Any,
                 categories: Sequence[dict] | None = None,
                 report_path: str | Path | None = None, seed: int = 0) -> ConversionReport:
    """Read an official ``.pth``/``.ckpt`` safely (no torch, no code run), convert it, write ``out``.

    ``out`` is a MindSpore checkpoint (written atomically) holding every parameter of our network and the
    metadata of :func:`checkpoint_metadata`; ``report_path`` (optional) gets the report as JSON. See
    :func:`convert_state_dict` for ``num_classes`` and ``categories``.
    """
    from msdet.conversion.torch_reader import load_torch_state
    from msdet.engine.checkpoint import save_weights

    src = Path(src)
    state = load_torch_state(src)
    network, report = convert_state_dict(model, state, num_classes, categories=categories, cfg=cfg,
                                         source=str(src), source_sha256=sha256_file(src), seed=seed)
    save_weights(out, network, checkpoint_metadata(report))
    if report_path is not None:
        write_json(report_path, report.as_dict())
    return report


__all__ = ["ConversionError", "ConversionReport", "convert_state_dict", "convert_file", "category_ids_for",
           "to_official_state_dict", "select_state", "infer_num_classes", "official_categories", "restrict_classes",
           "check_normalisation", "checkpoint_metadata", "COCO_CATEGORIES", "MODELS"]
