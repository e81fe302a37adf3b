"""One kernel library (a ``.cc`` of this package) and the one way to make its MindSpore ops.

A :class:`KernelLibrary` is compiled when switched on (:meth:`KernelLibrary.enable`; cached, see
:mod:`msdet.kernels.build`) or stays off after one printed line saying why and what runs instead. Its entry points
become ``ops.Custom(..., func_type="aot")`` primitives through :meth:`KernelLibrary.op`: a shape function and a
dtype function (by default the first input's), and for a differentiable op a ``bprop`` that calls the library's
gradient op(s) - MindSpore inlines a primitive's bprop into the gradient graph, where a cell's ``bprop`` stays a
sub-graph call per use. The kernels' cells are built from these ops in three ways (the per-kernel modules):

- an ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.GroupNorm`` subclass whose training graph runs the op (same
  parameters, names and checkpoint layout; eval mode is the parent's ``construct``): the ``conv2d``,
  ``batch_norm2d`` and ``group_norm`` parts of :mod:`msdet.train_ops`;
- a parameter-free cell that a network's layer runs in its training graph (``self.fast``): swish, LeakyReLU, the
  SE block, the stem max-pool;
- a whole-step op over every tensor of the step (the clipping norm, AdamW, the EMA), the last two writing their
  inputs in place (``writes=True``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from msdet.kernels import build

#: activation name -> its code in activation.h (``Act``): the activation a norm kernel applies after its affine
#: transform (``fuse_activation`` of the BatchNorm and GroupNorm cells; msdet.models.layers.norm_act)
ACTIVATION_CODES = {None: 0.0, "leaky_relu": 1.0, "swish": 2.0}


class FusedActivation:
    """The activation a norm kernel's cell applies after its affine transform (``activation``, ``slope``; none
    until :meth:`fuse_activation`); the cell rebuilds its config tensor in ``_set_cfg()``."""

    activation: str | None = None
    slope: float = 0.0

    def fuse_activation(self, name: str, slope: float = 0.0) -> bool:
        """Apply activation ``name`` ("leaky_relu" with ``slope``, or "swish") in the training op; False (nothing
        changed) for an activation the kernel does not have."""
        if name is None or name not in ACTIVATION_CODES:
            return False
        self.activation, self.slope = name, float(slope)
        self._set_cfg()
        return True


def same_as_first(*inputs: Any) -> Any:
    """Shape or dtype function: the first input's."""
    return inputs[0]


class KernelLibrary:
    """The kernel ``name`` compiled from ``source`` (with ``flags`` on top of ``build.CXXFLAGS``); ``fallback``
    says what runs while it is off; ``requires``: files (headers of a library it links) without which it is not
    built. Off until :meth:`enable`."""

    def __init__(self, name: str, source: Path, fallback: str, flags: tuple[str, ...] = (),
                 requires: tuple[Path, ...] = ()) -> None:
        self.name, self.source, self.fallback, self.flags, self.requires = name, Path(source), fallback, flags, requires
        self.path: Path | None = None
        self.on = False

    def why_not(self) -> str | None:
        """Why this host cannot build it (one phrase), or None."""
        reason = build.unsupported_host()
        if reason is None:
            missing = [str(p) for p in self.requires if not Path(p).is_file()]
            if missing:
                reason = f"{', '.join(missing)} not found"
        return reason

    def enable(self, on: bool) -> bool:
        """Switch on (building the library, cached) or off; returns whether it is on. A library that cannot be built
        stays off after one printed line."""
        if on and self.path is None:
            reason = self.why_not()
            if reason is None:
                try:
                    self.path = build.build_library(self.source, flags=self.flags)
                except (OSError, build.subprocess.CalledProcessError) as exc:
                    detail = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()
                    reason = f"building {self.source.name} failed ({detail[0] if detail else exc})"
            if reason is not None:
                print(f"cpu kernel {self.name} off: {reason}; {self.fallback}", flush=True)
            on = self.path is not None
        self.on = bool(on)
        return self.on

    def op(self, function: str, out_shape: Callable[..., Any] = same_as_first,
           out_dtype: Callable[..., Any] = same_as_first, bprop: Callable[..., Any] | None = None,
           writes: bool = False):
        """The ``Custom`` "aot" primitive of entry point ``function``. ``writes``: the op writes its inputs in
        place (``side_effect_mem``: without the mark the graph hands it copies of Parameters, and the writes are
        lost)."""
        from mindspore import ops

        if self.path is None:
            raise RuntimeError(f"cpu kernel {self.name} is not built (enable it first)")
        kwargs = {"bprop": bprop} if bprop is not None else {}
        op = ops.Custom(f"{self.path}:{function}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                        **kwargs)
        if writes:
            op.add_prim_attr("side_effect_mem", True)
        return op
