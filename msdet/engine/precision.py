"""Training precision (``runtime.precision``): float32, or float16 mixed precision with dynamic loss scaling.

The levels follow MindSpore's ``amp.auto_mixed_precision`` (mindspore.amp docs) and mindyolo's ``ms_amp_level``:
``amp_o1`` runs the cells of MindSpore's O1 white list (``amp.get_white_list()``: convolutions, dense layers) in
float16; ``amp_o2`` runs the whole network in float16 except the cells of its O2 black list
(``amp.get_black_list()``: BatchNorm, LayerNorm), GroupNorm and NanoDet's box decoding integral. They are set
with ``Cell.to_float`` on the network's own cells (what ``auto_mixed_precision`` does for O2, without wrapping
cells), so the cell tree, the parameter names and the checkpoints stay as in float32. The weights stay float32
(the master copy of Micikevicius et al. 2018, "Mixed Precision Training"); each float16 cell casts them for its
own use.
The detectors' loss cells cast the network outputs back to float32 (their ``float32_outputs``), so the losses,
the assigners and the box decoding run in float32.

Loss scaling (Micikevicius et al. 2018, sec. 3.2): the loss is multiplied by a scale before the backward pass
and the gradients are divided by it after, so that float16 gradients below 2^-24 do not flush to zero.
MindSpore's ``amp.DynamicLossScaler`` adjusts the scale and ``amp.all_finite`` checks the gradients; a step
whose gradients are not finite on any rank is skipped on every rank (the flag is summed over the ranks, as
MindSpore's ``TrainOneStepWithLossScaleCell`` does).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, amp, nn, ops

from msdet.config import LossScaleConfig
from msdet.ops.distance_coder import Integral

#: the settings of ``runtime.precision``
PRECISIONS = ("fp32", "amp_o1", "amp_o2")

#: Ascend operator precision mode for every setting: the dtypes of the graph as written (float32 in fp32 and in
#: the float32 islands of the AMP levels). MindSpore's default on Atlas training series (Ascend 910) is
#: "force_fp16", which runs convolutions and matrix products in float16 even in a float32 graph.
ASCEND_PRECISION_MODE = "must_keep_origin_dtype"

#: the CPU kernels (msdet/kernels) that take the network's activations: float32-only, so off at an AMP level
#: (the BatchNorm and GroupNorm kernels run on float32 islands, the clipping norm and the AdamW/EMA update on
#: the float32 gradients and weights, so those stay on)
ACTIVATION_KERNELS = ("depthwise_conv", "activations", "max_pool", "upsample", "dense_conv")


#: cells that stay float32 at both AMP levels: MindSpore's O2 black list, GroupNorm, and NanoDet's distance
#: integral (box decoding, called by the loss on the float32 outputs). At amp_o1 a norm after a float16 conv
#: would otherwise run in float16, and the CPU BatchNorm kernel is float32 only.
FLOAT32_CELLS = (*amp.get_black_list(), nn.GroupNorm, Integral)


def is_mixed(precision: str) -> bool:
    return precision != "fp32"


def apply_precision(network: nn.Cell, precision: str) -> nn.Cell:
    """Set the float16 cells of ``precision`` in ``network`` (in place; ``fp32`` changes nothing)."""
    if precision == "amp_o1":
        white = tuple(c for c in amp.get_white_list() if isinstance(c, type) and issubclass(c, nn.Cell))
        for _, cell in network.cells_and_names():
            if isinstance(cell, white):
                cell.to_float(ms.float16)
            elif isinstance(cell, FLOAT32_CELLS):
                cell.to_float(ms.float32)
    elif precision == "amp_o2":
        network.to_float(ms.float16)
        for _, cell in network.cells_and_names():
            if isinstance(cell, FLOAT32_CELLS):
                cell.to_float(ms.float32)
    elif precision != "fp32":
        raise ValueError(f"runtime.precision = {precision!r} is not one of {list(PRECISIONS)}")
    return network


class LossScaling(nn.Cell):
    """MindSpore's ``DynamicLossScaler`` with the finite check reduced over ``group_size`` ranks and a count of
    the skipped steps. Its state (scale, finite steps since the last change, skipped steps) are parameters
    named ``loss_scale.*``: the resume checkpoint carries them."""

    def __init__(self, cfg: LossScaleConfig, group_size: int = 1) -> None:
        super().__init__(auto_prefix=False)
        self.scaler = amp.DynamicLossScaler(float(cfg.initial), int(cfg.factor), int(cfg.window))
        self.scaler.scale_value.name = "loss_scale.value"
        self.scaler.counter.name = "loss_scale.good_steps"
        self.value, self.good_steps = self.scaler.scale_value, self.scaler.counter
        self.skipped = Parameter(Tensor(0, ms.int32), name="loss_scale.skipped_steps", requires_grad=False)
        #: steps skipped while the scale was already at its floor of 1 (lowering it cannot help any more); counted
        #: in the graph so the trainer reads it only when it checks, not after every step; not checkpointed
        self.floor_skips = Parameter(Tensor(0, ms.int32), name="loss_scale.floor_skips", requires_grad=False)
        self.all_reduce = ops.AllReduce() if group_size > 1 else None

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def unscale(self, grads: tuple) -> tuple:
        return self.scaler.unscale(grads)

    def finite(self, grads: tuple) -> Tensor:
        """True when every gradient is finite on every rank."""
        finite = amp.all_finite(grads)
        if self.all_reduce is not None:
            finite = self.all_reduce(ops.logical_not(finite).astype(ms.float32)) < 0.5
        return finite

    def update(self, finite: Tensor) -> Tensor:
        """Adjust the scale and count a skipped step (and one at the floor scale); returns the new skipped count."""
        skipped = ops.logical_not(finite).astype(ms.int32)
        at_floor = (self.value <= 1.0).astype(ms.int32)  # read before adjust() changes it
        counted = ops.assign_add(self.floor_skips, skipped * at_floor)
        adjusted = self.scaler.adjust(ops.depend(finite, counted))
        return ops.assign_add(self.skipped, ops.depend(skipped, adjusted))

    def state(self) -> list[Parameter]:
        return [self.value, self.good_steps, self.skipped]


class ScaledLoss(nn.Cell):
    """``loss_cell`` with its first output (the loss that is differentiated) multiplied by the loss scale."""

    def __init__(self, loss_cell: nn.Cell, scaling: LossScaling) -> None:
        super().__init__(auto_prefix=False)
        self.loss_cell, self.scaling = loss_cell, scaling

    def construct(self, image, gt_boxes, gt_labels, epoch):
        out = self.loss_cell(image, gt_boxes, gt_labels, epoch)
        return (self.scaling.scale(out[0]),) + out[1:]
