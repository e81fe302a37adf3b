"""ImageNet backbone starts (``<model>.pretrained_backbone``): load a backbone so that it computes what its
authors trained.

Sources: mindcv 0.3.0's published checkpoints (``"mindcv"``: downloaded once into ``$MSDET_CACHE`` and
verified), or a local MindSpore checkpoint in our names (e.g. one of our detector checkpoints), in the
PyTorch/torchvision names (NanoDet) or in mindcv's names.

BatchNorm eps. mindcv trains EfficientNet-B0 with MindSpore's default eps 1e-5 (``mindcv/models/efficientnet.py``:
``nn.BatchNorm2d`` unless width >= 1.6); our D0 backbone uses automl's 1e-3. Loaded as they are, those
statistics give other features (about 1e-3 relative on random statistics, far more where a channel's variance
is below 1e-3). We fold the difference into the BN scale at load time,
gamma' = gamma * sqrt((var + eps_ours) / (var + eps_file)) per channel (moving mean, moving variance and beta
unchanged), so that in eval mode the loaded backbone computes mindcv's function exactly, while the network
keeps the D0 recipe's eps, shapes and checkpoint layout (eval, export and conversion see an ordinary D0).
Training then continues with eps 1e-3, as the D0 recipe does; only train-mode batch statistics of
near-constant channels see the other eps. The alternative, running the backbone's BN with eps 1e-5, would make
the network's constants depend on where its weights came from, and every later consumer of a checkpoint
(eval, export, the converter's checks) would have to know it. ShuffleNetV2 (NanoDet, torchvision and mindcv)
uses 1e-5 throughout: nothing to fold.

Download integrity: mindcv publishes no checksums and its own downloader verifies nothing; the only value
knowable offline is the 8-hex-digit fragment in each file name (``efficientnet_b0-103ec70c.ckpt``), which we
pin and check as the prefix of the file's SHA-256 (the torchvision/OpenMMLab naming convention) before the
file enters the cache and before every use. That is a 32-bit check: it catches truncated, corrupted, or other
files, not a deliberate forgery. mindcv does not document how the fragment is made; if its files turn out not
to follow the convention, the download is refused with both values named and the file can still be checked
by hand and given as a local path. The model card records the full SHA-256 of the file that was read
(``pretrained_backbone_load.sha256``), so a user can pin that file with all 256 bits.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from msdet.atomic import atomic_path
from msdet.conversion.naming import (
    BN_TORCH_TO_MS,
    mindcv_efficientnet_b0_map,
    mindcv_shufflenet_v2_key,
    relative_parameters,
)
from msdet.engine.checkpoint import sha256_file


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A published ImageNet checkpoint: where it is, what of its SHA-256 we know, its BatchNorm eps."""

    url: str
    sha256_prefix: str
    bn_eps: float


#: mindcv 0.3.0 ``efficientnet_b0`` default_cfg URL (~21 MB); BN eps: ``nn.BatchNorm2d`` default.
MINDCV_EFFICIENTNET_B0 = PublishedCheckpoint(
    "https://download.mindspore.cn/toolkits/mindcv/efficientnet/efficientnet_b0-103ec70c.ckpt", "103ec70c", 1e-5)
#: mindcv 0.3.0 ``shufflenet_v2_x1_0`` default_cfg URL; BN eps: ``nn.BatchNorm2d`` default.
MINDCV_SHUFFLENET_V2_X1_0 = PublishedCheckpoint(
    "https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv2/shufflenet_v2_x1_0-0da4b7fa.ckpt",
    "0da4b7fa", 1e-5)
#: PyTorch's BatchNorm default, which torchvision's ShuffleNetV2 and NanoDet use.
TORCH_BN_EPS = 1e-5


class IntegrityError(RuntimeError):
    """A downloaded or cached file's SHA-256 is not the pinned one."""


# ----------------------------------------------------------------------------------------------------
# download


def cache_dir() -> Path:
    return Path(os.environ.get("MSDET_CACHE", Path.home() / ".cache" / "msdet"))


def verify_sha256(path: Path, sha256_prefix: str, url: str) -> str:
    """The file's full SHA-256; raise :class:`IntegrityError` naming the file and both digests unless it starts
    with the pin."""
    digest = sha256_file(path)
    if not digest.startswith(sha256_prefix.lower()):
        raise IntegrityError(f"pretrained_backbone 'mindcv': {path} (from {url}) has SHA-256 {digest}, expected one "
                             f"starting with the pinned {sha256_prefix}; the file is corrupt or not the published one")
    return digest


def cached_download(published: PublishedCheckpoint, param_key: str, timeout: float = 60.0) -> tuple[Path, str]:
    """The published file, downloaded once into the cache (``$MSDET_CACHE``, default ~/.cache/msdet) and its
    SHA-256 checked against the pin before it enters the cache and on every use; returns its path and full
    SHA-256.

    Offline: an error telling how to provide the file through ``param_key`` (e.g. ``d0.pretrained_backbone``).
    A download that fails the check never reaches the cache; a cached file that fails it is refused.
    """
    import urllib.error
    import urllib.request

    url = published.url
    dest = cache_dir() / Path(url).name
    if dest.is_file():
        try:
            return dest, verify_sha256(dest, published.sha256_prefix, url)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc} (cached copy: delete it to download again)") from None
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
            digest = verify_sha256(tmp, published.sha256_prefix, url)
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"pretrained_backbone 'mindcv': cannot download {url} ({exc}). Offline? Fetch that file on a "
            f"connected machine and set {param_key} to its local path (or place it at {dest})."
        ) from exc
    return dest, digest


#: file suffixes read as ``torch.save`` files (NumPy-only reader, no code from the file run)
TORCH_SUFFIXES = (".pth", ".pt")


def read_pretrained(path: Path) -> dict[str, np.ndarray]:
    """An ImageNet backbone checkpoint as ``{key: array}``: a MindSpore checkpoint, or a ``torch.save`` file
    (``.pth``/``.pt``, e.g. torchvision's ``shufflenetv2_x1-5666bf0f80.pth``, read with
    :mod:`msdet.conversion.torch_reader`). FileNotFoundError when absent, ValueError when unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_backbone: checkpoint {path} not found")
    if path.suffix in TORCH_SUFFIXES:
        from msdet.conversion.torch_reader import CheckpointError, load_torch_state

        try:
            return load_torch_state(path)
        except CheckpointError as exc:
            raise ValueError(f"pretrained_backbone: {exc}") from exc
    try:
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    except Exception as exc:
        raise ValueError(f"pretrained_backbone: {path} is not a readable MindSpore checkpoint "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


# ----------------------------------------------------------------------------------------------------
# loading


@dataclass
class BackboneLoad:
    """What a backbone load did (recorded in the model card)."""

    source: str
    layout: str
    #: full SHA-256 of the file read (for "mindcv": the one verified against the pin)
    sha256: str
    loaded: list[str] = field(default_factory=list)
    kept_initialisation: list[str] = field(default_factory=list)
    adaptations: list[str] = field(default_factory=list)

    def card(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "layout": self.layout,
                "tensors_loaded": len(self.loaded), "kept_initialisation": self.kept_initialisation,
                "adaptations": self.adaptations}


def fold_bn_eps(gamma: np.ndarray, variance: np.ndarray, eps_file: float, eps_net: float) -> np.ndarray:
    """BN scale that makes gamma' / sqrt(var + eps_net) == gamma / sqrt(var + eps_file) per channel (float64)."""
    var = variance.astype(np.float64)
    return (gamma.astype(np.float64) * np.sqrt((var + eps_net) / (var + eps_file))).astype(np.float32)


def _source(spec: str, published: PublishedCheckpoint, param_key: str) -> tuple[Path, str]:
    """The file ``spec`` names and its full SHA-256 (for "mindcv": the download, verified against the pin)."""
    if spec == "mindcv":
        return cached_download(published, param_key)
    path = Path(spec)
    return path, sha256_file(path) if path.is_file() else ""


def _load(model: nn.Cell, path: Path, digest: str, layout: str, ckpt: dict[str, np.ndarray],
          candidates: Callable[[str, nn.Cell], list[str]], eps_file: float | None,
          may_keep_init: Callable[[str], bool] = lambda local: False) -> BackboneLoad:
    """Copy every parameter of ``model`` from ``ckpt`` (keys from ``candidates``), with shape checks; fold the
    BatchNorm eps difference when the file was trained with ``eps_file`` (None: the network's own eps)."""
    report = BackboneLoad(str(path), layout, digest)
    values: dict[str, np.ndarray] = {}
    params = relative_parameters(model)
    for local, param, cell in params:
        keys = candidates(local, cell)
        key = next((k for k in keys if k in ckpt), None)
        if key is None:
            raise ValueError(f"pretrained_backbone: {path} ({layout} layout) has no tensor for backbone parameter "
                             f"'{local}' (looked for {', '.join(repr(k) for k in keys)})")
        value = ckpt[key]
        if tuple(value.shape) != tuple(param.shape):
            if may_keep_init(local):
                report.kept_initialisation.append(local)
                continue
            raise ValueError(f"pretrained_backbone: {path}: tensor '{key}' has shape {tuple(value.shape)}, "
                             f"backbone parameter '{local}' needs {tuple(param.shape)}")
        values[local] = np.asarray(value, dtype=np.float32)
    folded = 0
    for local, _, cell in params:
        if isinstance(cell, nn.BatchNorm2d) and local.endswith(".gamma") and eps_file is not None \
                and not np.isclose(cell.eps, eps_file, rtol=1e-6, atol=0.0) and local in values:
            variance = values.get(local[: -len("gamma")] + "moving_variance")
            if variance is not None:
                values[local] = fold_bn_eps(values[local], variance, eps_file, cell.eps)
                folded += 1
    if folded:
        eps_net = next(c.eps for _, _, c in params if isinstance(c, nn.BatchNorm2d))
        report.adaptations.append(
            f"BatchNorm eps: the file was trained with {eps_file:g}, the network uses {eps_net:g}; gamma of {folded} "
            f"BatchNorm cells scaled by sqrt((var + {eps_net:g}) / (var + {eps_file:g})) so that the loaded backbone "
            f"computes the file's function in eval mode; training continues with eps {eps_net:g}")
    for local, param, _ in params:
        if local in values:
            param.set_data(Tensor(values[local]))
            report.loaded.append(param.name)
    return report


def load_efficientnet_b0(model: nn.Cell, spec: str, param_key: str = "d0.pretrained_backbone") -> BackboneLoad:
    """Load EfficientNet-B0 weights into ``model`` (our ``EfficientNet``).

    ``spec``: "mindcv" (mindcv's ImageNet checkpoint, downloaded once and verified), or the path of a MindSpore
    checkpoint holding an EfficientNet-B0 either in our names (optionally prefixed ``backbone_net.model.`` or
    ``model.``; e.g. a D0 checkpoint, trained with our eps) or in mindcv's names (trained with eps 1e-5: folded,
    see the module docstring). Every backbone tensor must be present with our shape; extra tensors (ImageNet
    head, optimiser state) are ignored.
    """
    path, digest = _source(spec, MINDCV_EFFICIENTNET_B0, param_key)
    ckpt = read_pretrained(path)
    if any(k.startswith("features.") for k in ckpt):
        names = mindcv_efficientnet_b0_map(model)
        return _load(model, path, digest, "mindcv", ckpt, lambda local, cell: [names[local]],
                     MINDCV_EFFICIENTNET_B0.bn_eps)
    prefixes = ("", "backbone_net.model.", "model.")
    return _load(model, path, digest, "msdet", ckpt, lambda local, cell: [p + local for p in prefixes], None)


def load_shufflenet_v2(backbone: nn.Cell, spec: str, param_key: str = "nanodet.pretrained_backbone") -> BackboneLoad:
    """Load ShuffleNetV2 1.0x ImageNet weights into ``backbone`` (our ``ShuffleNetV2``).

    ``spec``: "mindcv" (mindcv 0.3.0's ImageNet checkpoint, downloaded once and verified), or the path of a
    checkpoint holding the backbone in our names (optionally prefixed ``backbone.``, e.g. a NanoDet
    checkpoint), in torchvision/NanoDet names (BatchNorm spelled weight/bias/running_mean/running_var:
    torchvision's ``shufflenetv2_x1-5666bf0f80.pth`` itself, the official NanoDet start, read without torch;
    its ``conv5``/``fc`` are ignored) or in mindcv's names.

    Ours/torchvision: every backbone tensor with our shape; the backbone then computes the file's function.
    mindcv's ShuffleNetV2 is the Megvii variant, another function with the same tensor names: it splits
    channels even/odd before a block where torchvision splits halves and shuffles after, stage2's first block
    has 24 + 92 output channels (torchvision 58 + 58), it uses ReLU (NanoDet LeakyReLU 0.1) and its max-pool
    pads bottom/right only. Tensors are mapped by name and every one must exist, but the stage2.0 tensors whose
    shapes differ (``branch1.2``, ``branch1.3``, ``branch2.5``, ``branch2.6``) keep their initialisation: a
    mindcv start is an approximate ImageNet start (README: the measured feature differences).
    """
    path, digest = _source(spec, MINDCV_SHUFFLENET_V2_X1_0, param_key)
    ckpt = read_pretrained(path)
    if any(k.startswith(("first_conv.", "features.")) for k in ckpt):
        report = _load(backbone, path, digest, "mindcv", ckpt, lambda local, cell: [mindcv_shufflenet_v2_key(local)],
                       MINDCV_SHUFFLENET_V2_X1_0.bn_eps, lambda local: local.startswith("stage2.0."))
        if report.kept_initialisation:
            print(f"pretrained_backbone: {path.name}: {len(report.loaded)} tensors loaded; "
                  f"{len(report.kept_initialisation)} keep their initialisation (mindcv's Megvii-style stage2.0 has "
                  f"other shapes): {', '.join(report.kept_initialisation)}")
        return report
    torch_leaf = {v: k for k, v in BN_TORCH_TO_MS.items()}
    layout = "torchvision" if any(k.endswith("running_mean") for k in ckpt) else "msdet"

    def candidates(local: str, cell: nn.Cell) -> list[str]:
        names = [local]
        if isinstance(cell, nn.BatchNorm2d):
            head, leaf = local.rsplit(".", 1)
            names.append(f"{head}.{torch_leaf[leaf]}")
        return [pre + name for name in names for pre in ("", "backbone.")]

    return _load(backbone, path, digest, layout, ckpt, candidates, TORCH_BN_EPS)


__all__ = ["BackboneLoad", "PublishedCheckpoint", "IntegrityError", "MINDCV_EFFICIENTNET_B0",
           "MINDCV_SHUFFLENET_V2_X1_0", "cache_dir", "cached_download", "verify_sha256", "read_pretrained",
           "fold_bn_eps", "load_efficientnet_b0", "load_shufflenet_v2"]
