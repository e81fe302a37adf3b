"""EfficientDet-D0 training path: anchor matching, focal/Huber losses against NumPy, the loss cell against a
NumPy re-computation, the whole gradient against finite differences, and optimizer steps in graph mode
lowering the loss."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.assigners.anchor_matcher import AnchorMatcher
from msdet.detectors.d0 import D0Detector
from msdet.losses.focal import huber_loss, sigmoid_focal_loss
from msdet.ops.box_coder import encode_np
from msdet.ops.iou import box_iou_np
from tests.helpers import config

# Hand-made anchors: 0 and 1 equal GT 0 / GT 1, 2 has IoU 0.25 with GT 2 (its best anchor), 3 has IoU 0.45 with
# GT 1 (ignored), 4 is far from everything, 5 equals a padding row's box.
ANCHORS = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [20, 20, 30, 20 + 100 / 4.5],
                    [200, 200, 210, 210], [100, 100, 120, 120]], np.float32)
GT_BOXES = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70], [100, 100, 120, 120]],
                     [[0, 0, 0, 0]] * 4], np.float32)
GT_LABELS = np.array([[4, 1, 2, -1], [-1, -1, -1, -1]], np.int32)


def _match(matcher, anchors=ANCHORS, boxes=GT_BOXES, labels=GT_LABELS):
    return [o.asnumpy() for o in matcher(Tensor(anchors), Tensor(boxes), Tensor(labels))]


def test_matcher_hand_cases():
    assert box_iou_np(ANCHORS[3:4], GT_BOXES[0, 1:2])[0, 0] == pytest.approx(0.45, abs=1e-6)
    boxes, labels, pos, neg = _match(AnchorMatcher(0.5, 0.4))
    np.testing.assert_array_equal(pos[0], [True, True, True, False, False, False])
    np.testing.assert_array_equal(neg[0], [False, False, False, False, True, True])   # 3 ignored
    np.testing.assert_array_equal(labels[0], [4, 1, 2, -1, -1, -1])
    np.testing.assert_array_equal(boxes[0, :3], GT_BOXES[0, :3])
    assert not pos[1].any() and neg[1].all() and (labels[1] == -1).all()            # image with only padding
    # without the force match, GT 2's best anchor (IoU 0.25) is a plain negative
    _, labels_nf, pos_nf, neg_nf = _match(AnchorMatcher(0.5, 0.4, force_match=False))
    assert not pos_nf[0, 2] and neg_nf[0, 2] and labels_nf[0, 2] == -1


def test_matcher_without_band_ignores_nothing():
    """automl: unmatched_threshold = match_threshold = 0.5, so anchor 3 (IoU 0.45) is background, not ignored."""
    _, labels, pos, neg = _match(AnchorMatcher(0.5, 0.5))
    np.testing.assert_array_equal(pos[0], [True, True, True, False, False, False])
    np.testing.assert_array_equal(neg[0], [False, False, False, True, True, True])
    assert (pos ^ neg).all()                                       # every anchor trained, none twice
    np.testing.assert_array_equal(labels[0], [4, 1, 2, -1, -1, -1])
    # on a dense grid of anchors around one object: a band ignores some, no band none
    xy = np.arange(0, 64, 2, dtype=np.float32)
    grid = np.array([[x, y, x + 24, y + 24] for y in xy for x in xy], np.float32)
    boxes = np.array([[[20, 20, 44, 44]]], np.float32)
    labels1 = np.array([[0]], np.int32)
    _, _, pos_b, neg_b = _match(AnchorMatcher(0.5, 0.4), grid, boxes, labels1)
    _, _, pos_n, neg_n = _match(AnchorMatcher(0.5, 0.5), grid, boxes, labels1)
    iou = box_iou_np(grid, boxes[0])[:, 0]
    band = (iou >= 0.4) & (iou < 0.5)
    assert band.sum() > 0
    np.testing.assert_array_equal(~(pos_b[0] | neg_b[0]), band)
    np.testing.assert_array_equal(pos_n[0], pos_b[0])
    assert (pos_n ^ neg_n).all()
    with pytest.raises(ValueError, match="neg_iou"):
        AnchorMatcher(0.5, 0.6)


def test_matcher_force_match_overrides_other_gt_and_thresholds():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 12]], np.float32)
    # GT 0 sits exactly on anchor 0; GT 1 overlaps anchor 1 more than GT 0 does, and claims anchor 1.
    boxes = np.array([[[0, 0, 10, 10], [0, 2, 10, 14]]], np.float32)
    labels = np.array([[0, 1]], np.int32)
    iou = box_iou_np(anchors, boxes[0])
    assert iou[1].argmax() == 0          # by IoU alone anchor 1 would go to GT 0 ...
    assert iou[:, 1].argmax() == 1       # ... but it is GT 1's best anchor
    _, lab, pos, _ = _match(AnchorMatcher(0.5, 0.4), anchors, boxes, labels)
    np.testing.assert_array_equal(lab[0], [0, 1])
    assert pos.all()


def test_matcher_in_graph_mode_matches_pynative():
    matcher = AnchorMatcher(0.5, 0.4)

    @ms.jit
    def match(a, b, c):
        return matcher(a, b, c)

    graph = [o.asnumpy() for o in match(Tensor(ANCHORS), Tensor(GT_BOXES), Tensor(GT_LABELS))]
    for g, p in zip(graph, _match(matcher)):
        np.testing.assert_array_equal(g, p)


@pytest.mark.parametrize("graph", [False, True])
def test_lean_matcher_gives_the_matches_of_the_cpu_one(graph):
    """Random GTs on D0's 128 px anchors, with repeated boxes (GTs sharing a best anchor: the lowest index must
    win), degenerate boxes and padding rows: the device formulation matches exactly as the CPU one."""
    rng = np.random.default_rng(3)
    anchors = D0Detector(config("d0", input_size=128), 6).anchors.astype(np.float32)
    xy = rng.uniform(0, 110, (4, 24, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 60, (4, 24, 2))], axis=-1).astype(np.float32)
    boxes[:, 12:18] = boxes[:, 6:12]            # repeated GTs
    boxes[:, 18:20, 2:] = boxes[:, 18:20, :2]   # zero-area boxes
    labels = rng.integers(0, 6, (4, 24)).astype(np.int32)
    labels[:, 20:] = -1
    labels[3] = -1                              # an image without objects
    cpu, lean = AnchorMatcher(0.5, 0.4, lean=False), AnchorMatcher(0.5, 0.4, lean=True)
    if graph:
        cpu, lean = ms.jit(cpu.construct), ms.jit(lean.construct)
    want = _match(cpu, anchors, boxes, labels)
    got = _match(lean, anchors, boxes, labels)
    assert want[2][:3].sum(axis=1).min() >= 12 and not want[2][3].any()  # force matches in every image
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def _focal_np(x, t, alpha, gamma):
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(t == 1, p, 1 - p)
    a_t = np.where(t == 1, alpha, 1 - alpha)
    return a_t * (1 - p_t) ** gamma * ce


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 1.5), (0.5, 0.0)])
def test_focal_loss_matches_numpy(alpha, gamma):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (4, 50)).astype(np.float32)
    t = (rng.uniform(size=(4, 50)) < 0.2).astype(np.float32)
    out = sigmoid_focal_loss(Tensor(x), Tensor(t), alpha, gamma).asnumpy()
    np.testing.assert_allclose(out, _focal_np(x.astype(np.float64), t, alpha, gamma), rtol=1e-4, atol=1e-6)
    if gamma == 0.0:   # reduces to alpha-weighted BCE
        bce = np.logaddexp(0, x) - x * t
        np.testing.assert_allclose(out, np.where(t == 1, 0.5, 0.5) * bce, rtol=1e-4, atol=1e-6)


def test_huber_matches_tf_definition():
    err = np.array([-0.3, -0.1, -0.05, 0.0, 0.02, 0.1, 0.5], np.float32)
    ref = np.where(np.abs(err) <= 0.1, 0.5 * err ** 2, 0.1 * (np.abs(err) - 0.05))
    out = huber_loss(Tensor(err), Tensor(np.zeros_like(err)), 0.1).asnumpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- the loss cell

SIZE = 128


def _batch():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    boxes = np.zeros((2, 6, 4), np.float32)
    labels = -np.ones((2, 6), np.int32)
    boxes[0, :3] = [[8, 12, 60, 70], [64, 30, 120, 100], [20, 80, 44, 110]]
    labels[0, :3] = [0, 2, 1]
    boxes[1, :2] = [[30, 30, 90, 90], [4, 100, 30, 124]]
    labels[1, :2] = [1, 1]
    return image, boxes, labels


def _loss_np(regression, logits, anchors, boxes, labels, cfg, num_classes):
    cls_sum, box_sum, num_pos = 0.0, 0.0, 0
    for b in range(boxes.shape[0]):
        valid = labels[b] >= 0
        gt, gl = boxes[b][valid], labels[b][valid]
        iou = box_iou_np(anchors, gt)                      # [A, G]
        best = iou.argmax(1)
        best_iou = iou.max(1)
        pos = best_iou >= cfg.pos_iou
        neg = best_iou < cfg.neg_iou
        for g in range(gt.shape[0]):                       # force match, lowest GT index wins on ties
            a = iou[:, g].argmax()
            if not any(iou[:, h].argmax() == a for h in range(g)):
                best[a], pos[a], neg[a] = g, True, False
        target = np.zeros((anchors.shape[0], num_classes))
        target[pos, gl[best[pos]]] = 1
        fl = _focal_np(logits[b].astype(np.float64), target, cfg.focal_alpha, cfg.focal_gamma)
        cls_sum += fl[pos | neg].sum()
        enc = encode_np(gt[best[pos]], anchors[pos])
        err = np.abs(regression[b][pos] - enc)
        d = cfg.huber_delta
        box_sum += np.where(err <= d, 0.5 * err ** 2, d * (err - d / 2)).sum()
        num_pos += int(pos.sum())
    n = max(1, num_pos)
    cls = cls_sum / n
    box = box_sum / (4 * n) * cfg.box_loss_weight
    return cls + box, cls, box, num_pos


@pytest.mark.detector
def test_loss_cell_matches_numpy():
    cfg = config("d0", input_size=SIZE, drop_connect_rate=0.0)
    det = D0Detector(cfg, 3)
    net = det.build_network()
    net.set_train(False)
    image, boxes, labels = _batch()
    regression, logits = (o.asnumpy() for o in net(Tensor(image)))
    total, parts = det.loss_cell(net)(Tensor(image), Tensor(boxes), Tensor(labels), Tensor(0, ms.int32))
    ref_total, ref_cls, ref_box, num_pos = _loss_np(regression, logits, det.anchors, boxes, labels, cfg, 3)
    assert num_pos >= 5
    np.testing.assert_allclose(parts.asnumpy(), [ref_total, ref_cls, ref_box], rtol=2e-4)
    assert float(total.asnumpy()) == pytest.approx(ref_total, rel=2e-4)
    assert tuple(det.loss_names) == ("loss", "cls", "box")


@pytest.mark.detector
def test_training_steps_lower_the_loss_in_graph_mode():
    cfg = config("d0", input_size=SIZE, drop_connect_rate=0.0)
    det = D0Detector(cfg, 3)
    net = det.build_network()
    net.set_train(True)
    loss_cell = det.loss_cell(net)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=2e-3, weight_decay=0.0)
    grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters, has_aux=True)

    @ms.jit
    def step(image, boxes, labels, epoch):
        (loss, parts), grads = grad_fn(image, boxes, labels, epoch)
        grads = ops.clip_by_global_norm(grads, 10.0)
        return ops.depend(loss, optimizer(grads)), parts

    batch = [Tensor(a) for a in _batch()] + [Tensor(0, ms.int32)]
    history = [step(*batch)[1].asnumpy() for _ in range(6)]
    names = [p.name for p in net.get_parameters()]
    assert names[0] == "backbone_net.model._conv_stem.conv.weight"     # the loss cell kept our names
    assert np.isfinite(history).all()
    first, last = history[0], history[-1]
    assert last[0] < 0.75 * first[0], history      # automl's head init starts ~half as high as zylo117's
    assert last[2] < first[2] and last[1] < first[1]


@pytest.mark.detector
def test_gradient_matches_finite_differences(pynative):
    """The framework's gradient of the whole D0 loss against central differences along a random direction per
    module (a wrong kernel gradient, as MindSpore 2.8's PadV3Grad on CPU, trains slowly without failing).
    The first six backbone blocks are left out: their loss surface bends too sharply for float32 differences.
    PyNative: a handful of forward passes is cheaper than compiling them."""
    _check_gradient_by_module()


def _check_gradient_by_module():
    # anchor scale 4 (official): the directions and eps were calibrated on its matching; at the embedded 2.0 the
    # float32 differences of the backbone group drift 17 % off (the gradient code is the same)
    cfg = config("d0", input_size=SIZE, drop_connect_rate=0.0, anchor_scale=4.0)
    det = D0Detector(cfg, 3)
    net = det.build_network()
    loss_cell = det.loss_cell(net)
    loss_cell.set_train(True)
    batch = [Tensor(a) for a in _batch()] + [Tensor(0, ms.int32)]
    params = loss_cell.trainable_params()

    def total_loss(*inputs):
        return loss_cell(*inputs)[0]

    _, grads = ms.value_and_grad(total_loss, None, params)(*batch)
    early = tuple(f"._blocks.{i}." for i in range(6))
    groups = {"backbone (blocks 6-15)": lambda n: n.startswith("backbone_net.") and not any(e in n for e in early),
              "bifpn": lambda n: n.startswith("bifpn."), "regressor": lambda n: n.startswith("regressor."),
              "classifier": lambda n: n.startswith("classifier.")}
    rng = np.random.default_rng(1)
    eps = 3e-4
    for group, member in groups.items():
        items = [(p, g, p.asnumpy().copy()) for p, g in zip(params, grads) if member(p.name)]
        dirs = [rng.normal(size=w.shape).astype(np.float32) * (np.abs(w).mean() + 1e-3) for _, _, w in items]
        analytic = sum(float((g.asnumpy() * d).sum()) for (_, g, _), d in zip(items, dirs))
        values = []
        for sign in (1.0, -1.0):
            for (p, _, w), d in zip(items, dirs):
                p.set_data(Tensor(w + sign * eps * d))
            values.append(float(loss_cell(*batch)[0].asnumpy()))
        for p, _, w in items:
            p.set_data(Tensor(w))
        numeric = (values[0] - values[1]) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=0.05), (group, analytic, numeric)
