"""NanoDet-Plus-m: architecture vs the official state dict, priors, box coding, decoding, output layout,
the dynamic soft-label assigner and the GFL/GIoU losses against NumPy references."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from msdet.assigners.dsl_assigner import DynamicSoftLabelAssigner
from msdet.conversion import pretrained
from msdet.conversion.naming import mindcv_shufflenet_v2_key as mindcv_key
from msdet.detectors.nanodet import NanoDetDetector
from msdet.losses.gfocal import distribution_focal_loss, quality_focal_loss
from msdet.losses.iou_loss import giou_loss
from msdet.models.flops import count_trainable
from msdet.models.ghostpan import Upsample2x, upsample_bilinear2x
from msdet.models.nanodet_plus import NanoDetPlus
from msdet.models.shufflenetv2 import MaxPool3x3s2p1, channel_shuffle, shuffle_concat
from msdet.ops.distance_coder import (
    Integral,
    bbox2distance,
    bbox2distance_np,
    distance2bbox,
    distance2bbox_np,
    integral_np,
)
from msdet.ops.priors import center_priors, num_priors
from tests.helpers import config, official_state_dict

pytestmark = pytest.mark.usefixtures("pynative")


@pytest.fixture(scope="module")
def net80():
    return NanoDetPlus(80)


def _official_state_dict() -> dict[str, tuple]:
    return {key: shape for key, (shape, _) in official_state_dict("nanodet").items()}


# ----------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.detector
def test_parameter_counts_match_official(net80):
    # the official counts are PyTorch parameters(): trainable tensors, BN statistics and buffers excluded
    assert count_trainable(net80) == 4_330_904
    assert count_trainable(net80, ("aux_fpn.", "aux_head.")) == 1_197_924
    all_tensors = sum(int(np.prod(p.shape)) for p in net80.get_parameters())
    assert all_tensors > 4_330_904  # moving statistics and the integral's projection are not trainable


@pytest.mark.detector
def test_official_keys_and_shapes_one_to_one(net80):
    official = _official_state_dict()
    mapping = official_name_map(net80)
    ours = {p.name: tuple(p.shape) for p in net80.get_parameters()}
    expected = {k: v for k, v in official.items() if not k.endswith("num_batches_tracked")}
    assert set(mapping) == set(expected)
    assert sorted(mapping.values()) == sorted(ours)  # every parameter of ours is used exactly once
    bad = [(k, expected[k], ours[v]) for k, v in mapping.items() if expected[k] != ours[v]]
    assert not bad, bad[:5]


@pytest.mark.detector
def test_gflops_at_320_match_official(net80):
    from msdet.models.flops import count_flops

    det = NanoDetDetector(config("nanodet", input_size=320), 80)
    report = count_flops(det.inference_cell(net80), (1, 3, 320, 320))
    assert report.macs == 450_712_800  # official: 0.451 GMACs = "0.9 GFLOPs"
    assert report.gflops == pytest.approx(0.90, abs=0.005)


@pytest.mark.detector
def test_aux_fpn_starts_as_a_copy_of_fpn(net80):
    fpn = {p.name[len("fpn."):]: p.asnumpy() for p in net80.fpn.get_parameters()}
    aux = {p.name[len("aux_fpn."):]: p.asnumpy() for p in net80.aux_fpn.get_parameters()}
    assert fpn.keys() == aux.keys()
    assert all(np.array_equal(fpn[k], aux[k]) for k in fpn)
    bias = net80.head.gfl_cls[0].bias.asnumpy()
    np.testing.assert_allclose(bias, -4.595)


def _bilinear2x_torch_np(x: np.ndarray) -> np.ndarray:
    """PyTorch bilinear, scale 2, align_corners=False (half-pixel centres, source clamped at 0)."""
    def axis(n):
        src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), src - i0
    y0, y1, ly = axis(x.shape[2])
    x0, x1, lx = axis(x.shape[3])
    ly = ly[:, None]
    top = x[:, :, y0][:, :, :, x0] * (1 - lx) + x[:, :, y0][:, :, :, x1] * lx
    bot = x[:, :, y1][:, :, :, x0] * (1 - lx) + x[:, :, y1][:, :, :, x1] * lx
    return top * (1 - ly) + bot * ly


def test_upsample_cell_trains_on_resize_bilinear_with_the_same_values_and_gradients():
    """Training graphs use ResizeBilinearV2, inference and export the slice form: both are PyTorch's bilinear
    x2, and their input gradients agree."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 10, 8)).astype(np.float32)
    cell = Upsample2x()
    grads = {}
    for training in (True, False):
        cell.set_train(training)
        np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), _bilinear2x_torch_np(x), atol=1e-5)

        def weighted(t, cell=cell):
            return (cell(t) * Tensor(dy)).sum()

        grads[training] = ms.grad(weighted)(Tensor(x)).asnumpy()
    assert np.abs(grads[True]).max() > 1.0
    np.testing.assert_allclose(grads[True], grads[False], atol=1e-5)


def test_upsample_and_channel_shuffle_semantics():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(upsample_bilinear2x(Tensor(x)).asnumpy(), _bilinear2x_torch_np(x), atol=1e-5)
    y = np.arange(2 * 6 * 2 * 2, dtype=np.float32).reshape(2, 6, 2, 2)
    shuffled = channel_shuffle(Tensor(y), 2).asnumpy()
    np.testing.assert_array_equal(shuffled, y[:, [0, 3, 1, 4, 2, 5]])
    a, b = Tensor(y[:, :3]), Tensor(y[:, 3:] + 100.0)
    np.testing.assert_array_equal(shuffle_concat(a, b).asnumpy(), channel_shuffle(ops.concat((a, b), 1), 2).asnumpy())
    dy = Tensor(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    grads = ms.grad(lambda p, q: (shuffle_concat(p, q) * dy).sum(), grad_position=(0, 1))(a, b)
    np.testing.assert_array_equal(grads[0].asnumpy(), dy.asnumpy()[:, 0::2])  # a's channels went to 0, 2, 4
    np.testing.assert_array_equal(grads[1].asnumpy(), dy.asnumpy()[:, 1::2])
    for h, w in ((6, 8), (7, 5)):  # PyTorch MaxPool2d(3, 2, padding=1): padding never wins
        z = np.random.default_rng(h).standard_normal((1, 2, h, w)).astype(np.float32) - 3.0
        zp = np.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        ref = np.array([[zp[..., 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(-1, -2)) for j in range(ow)]
                        for i in range(oh)]).transpose(2, 3, 0, 1)
        np.testing.assert_array_equal(MaxPool3x3s2p1()(Tensor(z)).asnumpy(), ref)


@pytest.mark.detector
def test_inference_cell_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    det = NanoDetDetector(config("nanodet", input_size=128), 3)
    net = det.build_network()
    net.set_train(False)
    infer = det.inference_cell(net)
    x = np.random.default_rng(9).standard_normal((1, 3, 128, 128)).astype(np.float32)
    ms.export(infer, Tensor(x), file_name=str(tmp_path / "nanodet"), file_format="ONNX")
    sess = ort.InferenceSession(str(tmp_path / "nanodet.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, infer(Tensor(x)).asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.detector
def test_output_layout_is_level_y_x_with_sigmoid_scores():
    det = NanoDetDetector(config("nanodet", input_size=128), 3)
    net = det.build_network()
    net.set_train(False)
    infer = det.inference_cell(net)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 128, 128)).astype(np.float32))
    out = infer(x).asnumpy()
    assert out.shape == (2, 340, 3 + 32) and num_priors(128) == 340
    raw = net(x).asnumpy()
    np.testing.assert_allclose(out[..., :3], 1 / (1 + np.exp(-raw[..., :3])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[..., 3:], raw[..., 3:], rtol=1e-5, atol=1e-5)
    # per-level maps of the head, read at the prior of (level 1, y 3, x 5) and (level 3, y 1, x 0)
    feats = net.fpn(net.backbone(x))
    for lvl, (y, xx) in ((1, (3, 5)), (3, (1, 0))):
        f = feats[lvl]
        for conv in net.head.cls_convs[lvl]:
            f = conv(f)
        m = net.head.gfl_cls[lvl](f).asnumpy()
        w = m.shape[3]
        start = sum(int(np.prod(feats[i].shape[2:])) for i in range(lvl))
        np.testing.assert_allclose(raw[:, start + y * w + xx], m[:, :, y, xx], rtol=1e-4, atol=1e-5)


def _backbone_items(net, name_of=lambda local: local):
    prefix = "backbone."
    return {name_of(p.name[len(prefix):]): p.asnumpy() for p in net.backbone.get_parameters()}


def official_name_map(net):
    return NanoDetDetector(config("nanodet", input_size=128), 3).official_name_map(net)


def load_pretrained_backbone(net, spec):
    return NanoDetDetector(config("nanodet", input_size=128), 3).load_pretrained_backbone(net, spec).loaded


@pytest.mark.detector
def test_pretrained_backbone_layouts_and_errors(tmp_path, net80):
    target = NanoDetPlus(3)
    det = NanoDetDetector(config("nanodet", input_size=128), 3)
    assert det.load_pretrained_backbone(target, "none") is None
    # our names (as in a NanoDet checkpoint, prefixed "backbone.") -> every backbone tensor copied
    ours = _backbone_items(net80, lambda local: "backbone." + local)
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in ours.items()], str(tmp_path / "ours.ckpt"))
    loaded = load_pretrained_backbone(target, str(tmp_path / "ours.ckpt"))
    assert len(loaded) == len(ours)
    assert all(np.array_equal(p.asnumpy(), ours[p.name]) for p in target.backbone.get_parameters())
    # a tensor missing / of another shape -> errors naming it
    missing = {k: v for k, v in ours.items() if k != "backbone.stage3.2.branch2.3.weight"}
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in missing.items()], str(tmp_path / "miss.ckpt"))
    with pytest.raises(ValueError, match="stage3.2.branch2.3.weight"):
        load_pretrained_backbone(target, str(tmp_path / "miss.ckpt"))
    wrong = dict(ours, **{"backbone.conv1.0.weight": np.zeros((24, 3, 5, 5), np.float32)})
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in wrong.items()], str(tmp_path / "wrong.ckpt"))
    with pytest.raises(ValueError, match=r"conv1\.0\.weight.*\(24, 3, 5, 5\)"):
        load_pretrained_backbone(target, str(tmp_path / "wrong.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_pretrained_backbone(target, str(tmp_path / "nope.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_pretrained_backbone(target, str(tmp_path / "junk.ckpt"))


@pytest.mark.detector
def test_pretrained_backbone_mindcv_layout(tmp_path, net80, monkeypatch):
    # mindcv (Megvii ShuffleNetV2): first_conv / features.k.branch_main / branch_proj; stage2.0 has other shapes
    items = _backbone_items(net80, mindcv_key)
    assert mindcv_key("stage3.0.branch1.2.weight") == "features.4.branch_proj.2.weight"
    assert mindcv_key("stage4.3.branch2.6.moving_mean") == "features.15.branch_main.6.moving_mean"
    items["features.0.branch_proj.2.weight"] = np.zeros((24, 24, 1, 1), np.float32)
    items["features.0.branch_main.5.weight"] = np.zeros((92, 58, 1, 1), np.float32)
    items["classifier.weight"] = np.zeros((1000, 1024), np.float32)
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in items.items()], str(tmp_path / "mindcv.ckpt"))
    target = NanoDetPlus(3)
    before = target.backbone.stage2[0].branch2[5].weight.asnumpy().copy()
    loaded = load_pretrained_backbone(target, str(tmp_path / "mindcv.ckpt"))
    assert len(loaded) == len(list(target.backbone.get_parameters())) - 2
    np.testing.assert_array_equal(target.backbone.stage2[0].branch2[5].weight.asnumpy(), before)
    np.testing.assert_array_equal(target.backbone.stage3[1].branch2[0].weight.asnumpy(),
                                  net80.backbone.stage3[1].branch2[0].weight.asnumpy())
    # "mindcv" without network access: a clear error telling how to proceed offline
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "MINDCV_SHUFFLENET_V2_X1_0", pretrained.PublishedCheckpoint(
        "http://127.0.0.1:9/shufflenet.ckpt", "00000000", 1e-5))
    with pytest.raises(RuntimeError, match="cannot download"):
        load_pretrained_backbone(target, "mindcv")


# ----------------------------------------------------------------------------------------------------
# priors, coding, decoding


def test_priors_320_128_256():
    p = center_priors(320)
    assert p.shape == (2125, 4) and num_priors(320) == 2125
    np.testing.assert_array_equal(p[:3], [[0, 0, 8, 8], [8, 0, 8, 8], [16, 0, 8, 8]])
    np.testing.assert_array_equal(p[40], [0, 8, 8, 8])
    np.testing.assert_array_equal(p[1599], [312, 312, 8, 8])
    np.testing.assert_array_equal(p[1600], [0, 0, 16, 16])
    np.testing.assert_array_equal(p[-2:], [[192, 256, 64, 64], [256, 256, 64, 64]])
    assert len(center_priors(128)) == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2
    p256 = center_priors(256)
    assert len(p256) == 1360
    np.testing.assert_array_equal(p256[-1], [192, 192, 64, 64])
    np.testing.assert_array_equal(p256[1024], [0, 0, 16, 16])


def test_distance_round_trip_and_clamp():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 100, (50, 2)).astype(np.float32)
    d = rng.uniform(0, 40, (50, 4)).astype(np.float32)
    boxes = distance2bbox_np(pts, d)
    np.testing.assert_allclose(bbox2distance_np(pts, boxes), d, atol=1e-4)
    ms_boxes = distance2bbox(Tensor(pts), Tensor(d)).asnumpy()
    np.testing.assert_allclose(ms_boxes, boxes, atol=1e-4)
    np.testing.assert_allclose(bbox2distance(Tensor(pts), Tensor(ms_boxes)).asnumpy(), d, atol=1e-4)
    clamped = bbox2distance(Tensor(pts), Tensor(ms_boxes), max_dis=7.0).asnumpy()
    np.testing.assert_allclose(clamped, np.clip(d, 0, 6.9), atol=1e-4)
    clipped = distance2bbox(Tensor(pts), Tensor(d), max_shape=(64, 80)).asnumpy()
    assert clipped[:, [0, 2]].max() <= 80 and clipped[:, [1, 3]].max() <= 64 and clipped.min() >= 0


@pytest.mark.detector
def test_integral_and_decode_against_numpy():
    rng = np.random.default_rng(3)
    reg = rng.standard_normal((2, 5, 32)).astype(np.float32) * 3
    got = Integral(7)(Tensor(reg)).asnumpy()
    logits = reg.reshape(2, 5, 4, 8).astype(np.float64)
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, (prob * np.arange(8)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(integral_np(reg, 7), (prob * np.arange(8)).sum(-1), atol=1e-9)

    det = NanoDetDetector(config("nanodet", input_size=128), 2)
    out = rng.standard_normal((1, 340, 2 + 32)).astype(np.float32) * 2
    boxes, scores = det.decode([out])
    np.testing.assert_array_equal(scores, out[..., :2])
    for i in (0, 17, 255, 256 + 9, 339):  # a prior of every level
        x, y, s = center_priors(128)[i][:3]
        lg = out[0, i, 2:].reshape(4, 8).astype(np.float64)
        dist = (np.exp(lg) / np.exp(lg).sum(1, keepdims=True) * np.arange(8)).sum(1) * s
        ref = np.clip([x - dist[0], y - dist[1], x + dist[2], y + dist[3]], 0, 128)
        np.testing.assert_allclose(boxes[0, i], ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        det.decode([out[:, :100]])


# ----------------------------------------------------------------------------------------------------
# assigner


def _iou_np(a, b, eps=1e-6):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, eps)


def _dsl_reference(logits, priors, boxes, gt_boxes, gt_labels, topk=13, iou_factor=3.0):
    """A literal NumPy port of the official DynamicSoftLabelAssigner.assign for ONE image (no padding).
    Returns (gt index per prior, -1 = negative; IoU per prior; priors claimed by several GTs)."""
    logits, boxes, gt_boxes = (np.asarray(v, np.float64) for v in (logits, boxes, gt_boxes))
    num_gt, num_p = len(gt_boxes), len(boxes)
    assigned = -np.ones(num_p, int)
    ious_out = np.zeros(num_p)
    if num_gt == 0:
        return assigned, ious_out, []
    c = priors[:, None, :2]
    deltas = np.concatenate([c - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - c], -1)
    valid = (deltas.min(-1) > 0).sum(1) > 0
    if not valid.any():
        return assigned, ious_out, []
    vb, vs = boxes[valid], logits[valid]
    ious = _iou_np(vb, gt_boxes)
    iou_cost = -np.log(ious + 1e-7)
    onehot = np.eye(logits.shape[1])[gt_labels][None]                         # [1, G, C]
    soft = onehot * ious[..., None]                                           # [V, G, C]
    x = np.repeat(vs[:, None], num_gt, 1)
    sig = 1 / (1 + np.exp(-x))
    bce = np.maximum(x, 0) - x * soft + np.log1p(np.exp(-np.abs(x)))
    cost = (bce * np.abs(soft - sig) ** 2).sum(-1) + iou_factor * iou_cost
    match = np.zeros_like(cost)
    k_top = min(topk, len(vb))
    dyn = np.maximum(np.sort(ious, 0)[::-1][:k_top].sum(0).astype(int), 1)
    for g in range(num_gt):
        match[np.argsort(cost[:, g], kind="stable")[:dyn[g]], g] = 1
    multi = match.sum(1) > 1
    contested = list(np.flatnonzero(valid)[multi])
    if multi.any():
        match[multi] = 0
        match[multi, cost[multi].argmin(1)] = 1
    fg = match.sum(1) > 0
    idx = np.flatnonzero(valid)[fg]
    assigned[idx] = match[fg].argmax(1)
    ious_out[idx] = (match * ious).sum(1)[fg]
    return assigned, ious_out, contested


def _run_assigner(logits, priors, boxes, gt_boxes, gt_labels):
    a = DynamicSoftLabelAssigner(13, 3.0)
    gt, iou, matching = a(Tensor(logits, ms.float32), Tensor(priors, ms.float32), Tensor(boxes, ms.float32),
                          Tensor(gt_boxes, ms.float32), Tensor(gt_labels, ms.int32))
    return gt.asnumpy(), iou.asnumpy(), matching.asnumpy()


def _random_image(rng, priors, num_classes, gts):
    p = len(priors)
    logits = rng.standard_normal((p, num_classes)) * 2 - 2
    d = rng.uniform(2, 40, (p, 4))
    boxes = distance2bbox_np(priors[:, :2], d)
    return logits, boxes, np.asarray(gts, np.float64)


def test_assigner_matches_official_reference_with_padding():
    rng = np.random.default_rng(4)
    priors = center_priors(128)
    imgs = [
        [[10, 12, 60, 80], [50, 40, 120, 100], [30, 30, 90, 70], [0, 0, 128, 128]],
        [[5, 5, 40, 40], [70, 20, 126, 60]],
        [[20, 60, 110, 125], [1, 1, 6, 6]],  # the second has no prior inside it
    ]
    labels = [[1, 2, 2, 0], [0, 3], [2, 1]]
    m = 5
    logits, boxes, gtb, gtl, refs = [], [], np.zeros((3, m, 4)), -np.ones((3, m), int), []
    for i, (g, lab) in enumerate(zip(imgs, labels)):
        lg, bx, gb = _random_image(rng, priors, 4, g)
        # padded slots sit first in image 1, to check that their position does not matter
        slots = list(range(m - len(g), m)) if i == 1 else list(range(len(g)))
        gtb[i, slots], gtl[i, slots] = gb, lab
        logits.append(lg)
        boxes.append(bx)
        ref_gt, ref_iou, _ = _dsl_reference(lg, priors, bx, gb, np.asarray(lab))
        refs.append((np.where(ref_gt >= 0, np.asarray(slots)[ref_gt], -1), ref_iou))
    gt, iou, matching = _run_assigner(np.stack(logits), priors, np.stack(boxes), gtb, gtl)
    for i, (ref_gt, ref_iou) in enumerate(refs):
        assert (ref_gt >= 0).sum() > 0
        np.testing.assert_array_equal(gt[i], ref_gt)
        np.testing.assert_allclose(iou[i], ref_iou, rtol=1e-4, atol=1e-5)
    assert np.all(matching.sum(-1) == (gt >= 0))


def test_assigner_gt_without_inside_prior_and_empty_image():
    priors = center_priors(128)
    rng = np.random.default_rng(5)
    lg, bx, _ = _random_image(rng, priors, 3, [])
    # a 5x5 box strictly between grid points of every level: no prior lies inside any GT -> no positives
    gtb = np.zeros((2, 3, 4))
    gtl = -np.ones((2, 3), int)
    gtb[0, 0], gtl[0, 0] = [1, 1, 6, 6], 1
    gt, iou, _ = _run_assigner(np.stack([lg, lg]), priors, np.stack([bx, bx]), gtb, gtl)
    assert np.all(gt == -1) and np.all(iou == 0)  # image 0: GT without candidates; image 1: no GT at all


def test_assigner_contested_prior_goes_to_lowest_cost():
    priors = center_priors(128)[:256]  # stride-8 level only, for a readable case
    p = len(priors)
    logits = np.full((p, 2), -6.0)
    boxes = distance2bbox_np(priors[:, :2], np.full((p, 4), 2.0))  # poor 4x4 predictions everywhere...
    target = int(np.flatnonzero((priors[:, 0] == 32) & (priors[:, 1] == 32))[0])
    boxes[target] = [22, 22, 56, 56]  # ...but one, inside and overlapping both GTs
    gts = np.array([[20, 20, 44, 44], [26, 26, 60, 60]], np.float64)
    ious = _iou_np(boxes[target:target + 1], gts)[0]
    assert ious[1] > ious[0]  # GT 1 overlaps it more...
    logits[target, 0] = np.log(ious[0] / (1 - ious[0]))  # ...but its class-0 score equals the IoU with GT 0
    ref_gt, _, contested = _dsl_reference(logits, priors, boxes, gts, np.array([0, 1]))
    assert contested == [target]
    gt, _, matching = _run_assigner(logits[None], priors, boxes[None], gts[None], np.array([[0, 1]]))
    np.testing.assert_array_equal(gt[0], ref_gt)
    assert gt[0, target] == 0  # the lower total cost wins, not the higher IoU
    assert (gt[0] >= 0).sum() == 1 and np.all(matching[0].sum(-1) <= 1)


def _giou_loss_np(a, b, eps=1e-6):
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 1)
    union = np.maximum(np.prod(a[:, 2:] - a[:, :2], 1) + np.prod(b[:, 2:] - b[:, :2], 1) - inter, eps)
    enc = np.maximum(np.prod(np.clip(np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2]), 0, None), 1),
                     eps)
    return 1 - (inter / union - (enc - union) / enc)


def _official_loss_np(head_out, aux_out, priors, gt_boxes, gt_labels, c, reg_max=7):
    """The official NanoDetPlusHead.loss(preds, gt_meta, aux_preds) in NumPy: assignment per image on the
    aux predictions, then QFL / GIoU / DFL per head with the official normalisations."""
    def decode(out):
        return distance2bbox_np(priors[None, :, :2], integral_np(out[..., c:], reg_max) * priors[None, :, 2:3])

    main_boxes, aux_boxes = decode(head_out), decode(aux_out)
    labels, scores, targets, pos = [], [], [], []
    for i in range(len(head_out)):
        keep = gt_labels[i] >= 0
        gt_idx, iou, _ = _dsl_reference(aux_out[i, :, :c], priors, aux_boxes[i], gt_boxes[i][keep],
                                        gt_labels[i][keep])
        labels.append(np.where(gt_idx >= 0, gt_labels[i][keep][gt_idx], c))
        scores.append(iou)
        targets.append(gt_boxes[i][keep][np.maximum(gt_idx, 0)])
        pos.append(gt_idx >= 0)
    labels, scores, targets, pos = (np.concatenate(v) for v in (labels, scores, targets, pos))
    points = np.tile(priors, (len(head_out), 1))
    dist = np.clip((bbox2distance_np(points[:, :2], targets) / points[:, 2:3]), 0, reg_max - 0.1)
    num_pos = max(pos.sum(), 1.0)
    out = []
    for preds, boxes in ((head_out, main_boxes), (aux_out, aux_boxes)):
        cls = preds[..., :c].reshape(-1, c).astype(np.float64)
        reg = preds[..., c:].reshape(-1, 4, reg_max + 1).astype(np.float64)
        sig = 1 / (1 + np.exp(-cls))
        qfl = _bce_np(cls, 0) * sig ** 2
        rows = np.flatnonzero(pos)
        qfl[rows, labels[rows]] = (_bce_np(cls[rows, labels[rows]], scores[rows])
                                   * np.abs(scores[rows] - sig[rows, labels[rows]]) ** 2)
        w = sig[rows].max(1)
        wsum = max(w.sum(), 1.0)
        giou = 2.0 * (_giou_loss_np(boxes.reshape(-1, 4)[rows], targets[rows]) * w).sum() / wsum
        logp = reg[rows] - np.log(np.exp(reg[rows]).sum(-1, keepdims=True))
        d = dist[rows]
        left = d.astype(int)
        lp_l = np.take_along_axis(logp, left[..., None], -1)[..., 0]
        lp_r = np.take_along_axis(logp, left[..., None] + 1, -1)[..., 0]
        dfl = -(lp_l * (left + 1 - d) + lp_r * (d - left))
        out += [qfl.sum() / num_pos, giou, 0.25 * (dfl * w[:, None]).sum() / (4 * wsum)]
    return np.array([sum(out)] + out), int(pos.sum())


@pytest.mark.detector
def test_loss_cell_matches_official_loss_in_numpy():
    det = NanoDetDetector(config("nanodet", input_size=128), 3)
    net = det.build_network()
    net.set_train(False)  # deterministic BN: the two forward passes below see the same network
    rng = np.random.default_rng(8)
    image = Tensor(rng.standard_normal((2, 3, 128, 128)).astype(np.float32))
    gt_boxes = np.zeros((2, 4, 4), np.float32)
    gt_labels = -np.ones((2, 4), np.int32)
    gt_boxes[0, :3], gt_labels[0, :3] = [[10, 12, 60, 80], [50, 40, 120, 100], [2, 2, 5, 5]], [1, 2, 0]
    gt_boxes[1, 1:2], gt_labels[1, 1:2] = [[20, 30, 110, 120]], [0]
    head_out, aux_out = net.forward_train(image, Tensor(1.0, ms.float32))
    ref, num_pos = _official_loss_np(head_out.asnumpy(), aux_out.asnumpy(), det.priors, gt_boxes, gt_labels, 3)
    assert num_pos > 3
    total, parts = det.loss_cell(net)(image, Tensor(gt_boxes), Tensor(gt_labels), Tensor(0, ms.int32))
    np.testing.assert_allclose(parts.asnumpy(), ref, rtol=2e-4, atol=1e-6)
    assert float(total.asnumpy()) == pytest.approx(ref[0], rel=2e-4)


# ----------------------------------------------------------------------------------------------------
# losses


def _bce_np(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def test_quality_focal_loss_against_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 4)) * 3
    labels = np.array([0, 3, -1, 2, 4, -1, 1])  # 4 and -1: negatives
    score = rng.uniform(0, 1, 7)
    got = quality_focal_loss(Tensor(x, ms.float32), Tensor(labels, ms.int32), Tensor(score, ms.float32), 2.0)
    sig = 1 / (1 + np.exp(-x))
    ref = _bce_np(x, 0) * sig ** 2
    for i, lab in enumerate(labels):
        if 0 <= lab < 4:
            ref[i, lab] = _bce_np(x[i, lab], score[i]) * abs(score[i] - sig[i, lab]) ** 2
    np.testing.assert_allclose(got.asnumpy(), ref.sum(1), rtol=1e-5, atol=1e-6)


def test_distribution_focal_loss_against_numpy():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 8)) * 2
    label = rng.uniform(0, 6.9, 9)
    got = distribution_focal_loss(Tensor(x, ms.float32), Tensor(label, ms.float32)).asnumpy()
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    left = label.astype(int)
    ref = -(logp[np.arange(9), left] * (left + 1 - label) + logp[np.arange(9), left + 1] * (label - left))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_giou_loss_against_numpy():
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 15, 25], [0, 0, 2, 2]], np.float32)
    tgt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 10, 10, 20], [1, 1, 3, 3]], np.float32)
    got = giou_loss(Tensor(pred), Tensor(tgt)).asnumpy()
    ref = []
    for a, b in zip(pred.astype(np.float64), tgt.astype(np.float64)):
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        ref.append(1 - (inter / union - (enc - union) / enc))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(0.0, abs=1e-6) and got[1] > 1.0
