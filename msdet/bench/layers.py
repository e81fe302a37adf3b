"""Per-block timing of the training step (``python -m stages.bench --only profile --by-layer``).

Every row is one block type of a model, built standalone at the shapes it sees inside the network at the
params' input and batch size (e.g. EfficientNet's stage-2 depthwise 3x3 at 128 px, batch 8, is
``8 x 144 x 32 x 32``), compiled on its own in graph mode and timed forward and forward+backward (gradients
of the summed outputs w.r.t. the float inputs and every trainable weight, as in training). Target assignment
has no backward; the loss rows include the assignment (as the official losses do) and end their backward at
the head outputs; "optimizer_ema" is gradient clipping + the optimizer + the EMA update over all the model's
weights (the tail of :class:`msdet.engine.trainer.TrainStep`). Rows overlap (an MBConv holds a depthwise
conv, BN and swish): they locate time, they do not add up to the step. docs/performance.md compares the
same shapes in PyTorch (``serve`` below lets an outside script interleave the two frameworks).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msdet.config import Params

#: the rows of each model, in table order
ROWS = {
    "d0": ("stem", "mbconv_se", "dwconv3x3", "dwconv5x5", "conv1x1", "bn", "swish", "bifpn", "heads", "assign",
           "loss", "optimizer_ema"),
    "nanodet": ("stem", "shuffle_block", "dwconv3x3", "dwconv5x5", "conv1x1", "bn", "leaky_relu", "ghostpan",
                "heads", "assign", "loss", "optimizer_ema"),
}


@dataclass
class LayerCase:
    """``cell(*inputs)``; gradients w.r.t. the inputs at ``grad_inputs`` and the cell's trainable weights,
    or no backward at all (``backward`` False)."""

    name: str
    what: str
    cell: Any
    inputs: tuple
    grad_inputs: tuple[int, ...] = ()
    backward: bool = True
    shapes: list = field(default_factory=list)


def _tensor(array: np.ndarray) -> Any:
    from mindspore import Tensor

    return Tensor(np.array(array, copy=True))  # contiguous; np.ascontiguousarray would make 0-d arrays 1-d


def _chain(*cells: Any) -> Any:
    from mindspore import nn

    class Chain(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.CellList(list(cells))

        def construct(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Chain()


def _tuple_input(net: Any) -> Any:
    """``net(tuple_of_maps)`` as ``cell(*maps)``."""
    from mindspore import nn

    class TupleInput(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def construct(self, *maps):
            return self.net(maps)

    return TupleInput()


def _fixed_outputs(outputs: Sequence[np.ndarray], attrs: dict[str, Any]) -> Any:
    """Stand-in network for a loss cell: ``construct``/``forward_train`` return fixed head outputs held as
    trainable weights, so the loss row's backward ends at the head outputs."""
    from mindspore import Parameter, nn

    class HeadOutputs(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.out0 = Parameter(_tensor(outputs[0]), name="out0")
            self.out1 = Parameter(_tensor(outputs[1]), name="out1")
            for k, v in attrs.items():
                setattr(self, k, v)

        def construct(self, image):
            return self.out0 * 1.0, self.out1 * 1.0

        def forward_train(self, image, keep):
            return self.out0 * 1.0, self.out1 * 1.0

    return HeadOutputs()


def _optimizer_ema(network: Any, tcfg: Any) -> Any:
    from mindspore import nn, ops

    from msdet.engine.ema import EMA
    from msdet.engine.optim import SquareSum, clip_factor
    from msdet.engine.trainer import build_optimizer

    class OptimizerEma(nn.Cell):
        def __init__(self) -> None:
            super().__init__(auto_prefix=False)
            self.optimizer = build_optimizer(network, tcfg, np.full(1000, tcfg.lr, np.float32))
            self.ema = EMA(network, tcfg.ema_decay, tcfg.ema_ramp_steps)
            self.clip_norm = float(tcfg.grad_clip_norm)
            self.square_sum = SquareSum()

        def construct(self, grads, step):
            done = self.optimizer(grads, clip_factor(grads, self.clip_norm, self.square_sum))
            return ops.depend(done, self.ema(ops.depend(step, done)))

    return OptimizerEma()


def _gt(rng: np.random.Generator, batch: int, size: int, max_gt: int, num_classes: int) -> tuple:
    from msdet.bench.sections import synthetic_train_batch

    _, boxes, labels = synthetic_train_batch(batch, 8, max_gt, num_classes, seed=int(rng.integers(1 << 30)))
    return boxes * (size / 8.0), labels


def d0_cases(params: Params, num_classes: int) -> list[LayerCase]:
    import mindspore as ms
    from mindspore import nn

    from msdet.assigners.anchor_matcher import AnchorMatcher
    from msdet.bench.sections import synthetic_gt_rows
    from msdet.detectors.d0 import D0Detector, D0LossCell
    from msdet.models.bifpn import BiFPN
    from msdet.models.efficientdet import D0_SPEC, HeadNet
    from msdet.models.efficientnet import BlockArgs, MBConvBlock
    from msdet.models.layers import Conv2dSame, Swish, batch_norm

    cfg = params.d0
    s, b = cfg.input_size, cfg.train.batch_size
    rng = np.random.default_rng(0)

    def x(*shape):
        return _tensor(rng.standard_normal(shape).astype(np.float32))

    detector = D0Detector(cfg, num_classes, params.runtime.seed)
    spec = D0_SPEC
    feats = [(40, s // 8), (112, s // 16), (320, s // 32)]
    levels = [(spec.fpn_channels, s // 2 ** k) for k in range(3, 8)]
    n_gt = synthetic_gt_rows(params, "d0")
    gt_boxes, gt_labels = _gt(rng, b, s, n_gt, num_classes)
    anchors = detector.anchors
    n_anchor = anchors.shape[0]

    class Heads(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.regressor = HeadNet(spec.fpn_channels, spec.num_anchors, 4, spec.head_repeats, spec.num_levels)
            self.classifier = HeadNet(spec.fpn_channels, spec.num_anchors, num_classes, spec.head_repeats,
                                      spec.num_levels)

        def construct(self, *maps):
            return self.regressor(maps), self.classifier(maps)

    class Assign(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.anchors = _tensor(anchors.astype(np.float32))
            self.matcher = AnchorMatcher(cfg.pos_iou, cfg.neg_iou)

        def construct(self, boxes, labels):
            return self.matcher(self.anchors, boxes, labels)

    stub = _fixed_outputs([rng.standard_normal((b, n_anchor, 4)).astype(np.float32) * 0.1,
                           rng.standard_normal((b, n_anchor, num_classes)).astype(np.float32) - 4.0],
                          {"num_classes": num_classes})
    network = detector.build_network()
    grads = tuple(_tensor((rng.standard_normal(p.shape) * 1e-3).astype(np.float32))  # 0-d too: float32 scalar
                  for p in network.trainable_params())
    step = ms.Tensor(10.0, ms.float32)
    return [
        LayerCase("stem", "3x3 s2 conv 3->32 + BN + swish",
                  _chain(Conv2dSame(3, 32, 3, stride=2, bias=False), batch_norm(32), Swish()), (x(b, 3, s, s),),
                  (0,)),
        LayerCase("mbconv_se", "MBConv k3 24->144->24 with SE (stage 2 repeat)",
                  MBConvBlock(BlockArgs(3, 1, 24, 24, 6, 1)), (x(b, 24, s // 4, s // 4),), (0,)),
        LayerCase("dwconv3x3", "depthwise 3x3, 144 ch (stage 2)",
                  Conv2dSame(144, 144, 3, bias=False, groups=144), (x(b, 144, s // 4, s // 4),), (0,)),
        LayerCase("dwconv5x5", "depthwise 5x5, 240 ch (stage 3)",
                  Conv2dSame(240, 240, 5, bias=False, groups=240), (x(b, 240, s // 8, s // 8),), (0,)),
        LayerCase("conv1x1", "1x1 conv 24->144 (stage 2 expand)", Conv2dSame(24, 144, 1, bias=False),
                  (x(b, 24, s // 4, s // 4),), (0,)),
        LayerCase("bn", "BatchNorm 144 ch, training mode", batch_norm(144), (x(b, 144, s // 4, s // 4),), (0,)),
        LayerCase("swish", "x * sigmoid(x), 144 ch", Swish(), (x(b, 144, s // 4, s // 4),), (0,)),
        LayerCase("bifpn", "BiFPN, 3 repeats, 64 ch, P3-P7",
                  _tuple_input(BiFPN(spec.fpn_channels, tuple(c for c, _ in feats), spec.fpn_repeats)),
                  tuple(x(b, c, h, h) for c, h in feats), (0, 1, 2)),
        LayerCase("heads", "box + class nets on P3-P7", Heads(), tuple(x(b, c, h, h) for c, h in levels),
                  tuple(range(len(levels)))),
        LayerCase("assign", f"anchor IoU matching, {n_anchor} anchors x {n_gt} GT", Assign(),
                  (_tensor(gt_boxes), _tensor(gt_labels)), backward=False),
        LayerCase("loss", "assignment + focal + Huber, backward to the head outputs",
                  D0LossCell(stub, anchors, cfg), (x(1), _tensor(gt_boxes), _tensor(gt_labels),
                                                   ms.Tensor(0, ms.int32))),
        LayerCase("optimizer_ema", f"clip + {cfg.train.optimizer} + EMA over {len(grads)} weight tensors",
                  _optimizer_ema(network, cfg.train), (grads, step), backward=False),
    ]


def nanodet_cases(params: Params, num_classes: int) -> list[LayerCase]:
    import mindspore as ms
    from mindspore import nn

    from msdet.assigners.dsl_assigner import DynamicSoftLabelAssigner
    from msdet.bench.sections import synthetic_gt_rows
    from msdet.detectors.nanodet import NanoDetDetector, NanoDetLossCell
    from msdet.models.ghostpan import GhostPAN
    from msdet.models.nanodet_plus import NANODET_PLUS_M, NanoDetPlusHead, SimpleConvHead
    from msdet.models.shufflenetv2 import MaxPool3x3s2p1, ShuffleV2Block, _bn, _conv, activation_cell
    from msdet.ops.distance_coder import Integral

    cfg = params.nanodet
    spec = NANODET_PLUS_M
    s, b = cfg.input_size, cfg.train.batch_size
    act = spec.activation
    rng = np.random.default_rng(0)

    def x(*shape):
        return _tensor(rng.standard_normal(shape).astype(np.float32))

    detector = NanoDetDetector(cfg, num_classes)
    priors = detector.priors
    n_prior = priors.shape[0]
    width = spec.fpn_channels
    feats = [(116, s // 8), (232, s // 16), (464, s // 32)]
    levels = [s // st for st in spec.strides]
    n_gt = synthetic_gt_rows(params, "nanodet")
    gt_boxes, gt_labels = _gt(rng, b, s, n_gt, num_classes)
    out_ch = num_classes + 4 * (cfg.reg_max + 1)

    class Heads(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.head = NanoDetPlusHead(num_classes, width, width, spec.head_stacked_convs, spec.kernel_size,
                                        spec.strides, cfg.reg_max, act)
            self.aux_head = SimpleConvHead(num_classes, spec.aux_channels, spec.aux_channels,
                                           spec.aux_stacked_convs, spec.strides, cfg.reg_max, act)
            self.n = len(spec.strides)

        def construct(self, *maps):
            return self.head(maps[:self.n]), self.aux_head(maps[self.n:])

    class Assign(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.priors = _tensor(priors.astype(np.float32))
            self.assigner = DynamicSoftLabelAssigner(cfg.assigner_topk, cfg.assigner_iou_factor)

        def construct(self, logits, boxes, gt_b, gt_l):
            return self.assigner(logits, self.priors, boxes, gt_b, gt_l)

    half = rng.uniform(4.0, s / 4.0, (b, n_prior, 2)).astype(np.float32)
    pred_boxes = np.concatenate([priors[None, :, :2] - half, priors[None, :, :2] + half], -1)
    head_out = [rng.standard_normal((b, n_prior, out_ch)).astype(np.float32) for _ in range(2)]

    class DistributionProject(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.distribution_project = Integral(cfg.reg_max)

    stub = _fixed_outputs(head_out, {"num_classes": num_classes, "reg_max": cfg.reg_max,
                                     "head": DistributionProject()})
    network = detector.build_network()
    grads = tuple(_tensor((rng.standard_normal(p.shape) * 1e-3).astype(np.float32))  # 0-d too: float32 scalar
                  for p in network.trainable_params())
    step = ms.Tensor(10.0, ms.float32)
    maps = [x(b, width, h, h) for h in levels] + [x(b, spec.aux_channels, h, h) for h in levels]
    return [
        LayerCase("stem", "3x3 s2 conv 3->24 + BN + LeakyReLU + max-pool",
                  _chain(_conv(3, 24, 3, 2), _bn(24), activation_cell(act), MaxPool3x3s2p1()), (x(b, 3, s, s),),
                  (0,)),
        LayerCase("shuffle_block", "ShuffleNetV2 block, 116 ch (stage 2 repeat)", ShuffleV2Block(116, 116, 1, act),
                  (x(b, 116, s // 8, s // 8),), (0,)),
        LayerCase("dwconv3x3", "depthwise 3x3, 58 ch (stage 2 branch)", _conv(58, 58, 3, groups=58),
                  (x(b, 58, s // 8, s // 8),), (0,)),
        LayerCase("dwconv5x5", "depthwise 5x5, 96 ch (GhostPAN / head, stride 8)", _conv(96, 96, 5, groups=96),
                  (x(b, 96, s // 8, s // 8),), (0,)),
        LayerCase("conv1x1", "1x1 conv 96->96 (head, stride 8)", _conv(96, 96, 1), (x(b, 96, s // 8, s // 8),),
                  (0,)),
        LayerCase("bn", "BatchNorm 96 ch, training mode", _bn(96), (x(b, 96, s // 8, s // 8),), (0,)),
        LayerCase("leaky_relu", "LeakyReLU 0.1, 96 ch", activation_cell(act), (x(b, 96, s // 8, s // 8),), (0,)),
        LayerCase("ghostpan", f"GhostPAN, {width} ch, k{spec.kernel_size}, +1 level (the neck; training runs two)",
                  _tuple_input(GhostPAN([c for c, _ in feats], width, True, spec.kernel_size,
                                        num_extra_level=spec.num_extra_level, activation=act)),
                  tuple(x(b, c, h, h) for c, h in feats), (0, 1, 2)),
        LayerCase("heads", "NanoDetPlusHead + aux SimpleConvHead", Heads(), tuple(maps), tuple(range(len(maps)))),
        LayerCase("assign", f"dynamic soft-label assigner, {n_prior} priors x {n_gt} GT",
                  Assign(), (_tensor(head_out[1][..., :num_classes]), _tensor(pred_boxes), _tensor(gt_boxes),
                             _tensor(gt_labels)), backward=False),
        LayerCase("loss", "assignment + QFL + GIoU + DFL, main and aux, backward to the head outputs",
                  NanoDetLossCell(stub, priors, cfg), (x(1), _tensor(gt_boxes), _tensor(gt_labels),
                                                       ms.Tensor(0, ms.int32))),
        LayerCase("optimizer_ema", f"clip + {cfg.train.optimizer} + EMA over {len(grads)} weight tensors",
                  _optimizer_ema(network, cfg.train), (grads, step), backward=False),
    ]


def layer_cases(params: Params, model: str, num_classes: int) -> list[LayerCase]:
    cases = {"d0": d0_cases, "nanodet": nanodet_cases}[model](params, num_classes)
    for case in cases:
        case.shapes = [list(t.shape) for t in case.inputs if hasattr(t, "shape")]
        if hasattr(case.cell, "set_train"):
            case.cell.set_train(True)
    return cases


def runner(case: LayerCase, mode: str) -> Any:
    """A compiled callable running ``mode`` ("forward" or "forward_backward") of the case once, synchronised."""
    import mindspore as ms
    from mindspore import nn

    from msdet.bench.sections import _sync

    if mode == "forward":
        cell = case.cell
    else:
        class SumOf(nn.Cell):
            def __init__(self, net: nn.Cell) -> None:
                super().__init__(auto_prefix=False)
                self.net = net

            def construct(self, *x):
                out = self.net(*x)
                if isinstance(out, (tuple, list)):
                    total = 0.0
                    for o in out:
                        total = total + o.sum()
                    return total
                return out.sum()

        class ForwardBackward(nn.Cell):
            def __init__(self, net: nn.Cell, positions: tuple) -> None:
                super().__init__(auto_prefix=False)
                self.loss = SumOf(net)
                self.grad_fn = ms.value_and_grad(self.loss, positions or None, net.trainable_params())

            def construct(self, *x):
                return self.grad_fn(*x)

        cell = ForwardBackward(case.cell, case.grad_inputs)
    return lambda: _sync(cell(*case.inputs))


def train_step_runner(params: Params, model: str, num_classes: int) -> Any:
    """One compiled training step (:class:`msdet.engine.trainer.TrainStep`) on a fixed synthetic batch."""
    import tempfile

    import mindspore as ms
    from mindspore import Tensor

    from msdet.bench.sections import _no_dataset, synthetic_gt_rows, synthetic_train_batch
    from msdet.engine.trainer import TrainData, Trainer
    from msdet.training import build_detector

    cfg = getattr(params, model)
    detector = build_detector(params, model, num_classes)
    network = detector.build_network()
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        trainer = Trainer(detector, network, cfg.train, TrainData(_no_dataset, cfg.train.batch_size * 4), tmp,
                          progress=False)
    network.set_train(True)
    batch = [Tensor(a) for a in synthetic_train_batch(cfg.train.batch_size, cfg.input_size,
                                                       synthetic_gt_rows(params, model), num_classes,
                                                       seed=params.runtime.seed)]
    epoch, step = Tensor(0, ms.int32), Tensor(1.0, ms.float32)
    return lambda: trainer.step_fn(*batch, epoch, step)[1].asnumpy()


def bench_layers(params: Params, model: str, num_classes: int, repeats: int = 5) -> dict[str, Any]:
    """{"rows": [{name, what, shapes, forward_ms, forward_backward_ms, *_cpu_ms, *_first_call_s}], ...}."""
    from msdet.bench.sections import _timed, _timed_cpu
    from msdet.bench.stats import summarize

    rows = []
    for case in layer_cases(params, model, num_classes):
        row: dict[str, Any] = {"name": case.name, "what": case.what, "shapes": case.shapes}
        for mode in ("forward", "forward_backward") if case.backward else ("forward",):
            run = runner(case, mode)
            first, _ = _timed(run)
            wall_cpu = np.array([_timed_cpu(run) for _ in range(repeats)]) * 1000.0
            row[f"{mode}_first_call_s"] = round(first, 3)
            row[f"{mode}_ms"] = summarize(wall_cpu[:, 0])
            row[f"{mode}_cpu_ms"] = summarize(wall_cpu[:, 1])
        rows.append(row)
    cfg = getattr(params, model)
    return {"input_size": cfg.input_size, "batch_size": cfg.train.batch_size, "rows": rows}


def serve(params: Params, model: str, num_classes: int, stream_in: Any = sys.stdin,
          stream_out: Any = sys.stdout) -> None:
    """Compile every case, then answer lines ``NAME MODE REPEATS`` with a JSON list of wall ms per run: an
    outside script can interleave these runs with another framework's, so both see the same machine load."""
    from msdet.bench.sections import _timed

    runs = {("train_step", "forward"): train_step_runner(params, model, num_classes)}
    for case in layer_cases(params, model, num_classes):
        for mode in ("forward", "forward_backward") if case.backward else ("forward",):
            runs[(case.name, mode)] = runner(case, mode)
    for run in runs.values():
        run()
    print(json.dumps({"ready": sorted(f"{n} {m}" for n, m in runs)}), file=stream_out, flush=True)
    for line in stream_in:
        name, mode, reps = line.split()
        times = [_timed(runs[(name, mode)])[0] * 1000.0 for _ in range(int(reps))]
        print(json.dumps(times), file=stream_out, flush=True)


def main(argv: list[str] | None = None) -> int:
    from msdet.bench.sections import dataset_num_classes, setup
    from msdet.config import load_params

    ap = argparse.ArgumentParser(description="serve the per-block cases for an interleaved comparison")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", choices=tuple(ROWS), required=True)
    ap.add_argument("--mindrecord-dir", default="data/mindrecord")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    setup(params, {}, args.model)
    serve(params, args.model, dataset_num_classes(args.mindrecord_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
