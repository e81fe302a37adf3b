"""EfficientDet-D0 network: size, official key correspondence, output layout, layer semantics, FLOPs, backbone
loading. PyNative, small shapes."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.conversion import pretrained
from msdet.conversion.naming import NUM_BATCHES_TRACKED, mindcv_efficientnet_b0_map, relative_parameters
from msdet.detectors.d0 import D0Detector
from msdet.models.efficientdet import EfficientDet, HeadNet, init_heads
from msdet.models.flops import count_flops, count_macs
from msdet.models.layers import Conv2dSame, MaxPool2dSame, batch_norm, upsample_nearest2x
from msdet.ops.anchors import efficientdet_anchors
from tests.helpers import config, official_state_dict


def _reference_state_dict() -> dict:
    return {key: shape for key, (shape, _) in official_state_dict("d0").items()}


@pytest.fixture(scope="module")
def net80():
    return EfficientDet(80)


def _count(params):
    return sum(int(np.prod(p.shape)) for p in params)


@pytest.mark.detector
def test_parameter_counts(net80):
    # The official 3,874,217 is PyTorch's parameters(): trainable tensors only (BN running stats are buffers).
    assert _count(net80.trainable_params()) == 3_874_217
    # + BN moving mean/variance = the official state dict (3,921,461) minus its 108 num_batches_tracked scalars
    assert _count(net80.get_parameters()) == 3_921_461 - 108
    assert _count(EfficientDet(90).trainable_params()) == 3_880_067


@pytest.mark.detector
def test_official_keys_map_one_to_one(net80):
    reference = _reference_state_dict()
    name_map = D0Detector(config("d0", input_size=128), 80).official_name_map(net80)
    ours = {p.name: tuple(p.shape) for p in net80.get_parameters()}
    expected = {k: v for k, v in reference.items() if not k.endswith("." + NUM_BATCHES_TRACKED)}
    unmapped_kinds = {k.rsplit(".", 1)[-1] for k in reference if k not in name_map}
    assert unmapped_kinds == {NUM_BATCHES_TRACKED}
    assert set(name_map) == set(expected)
    assert sorted(name_map.values()) == sorted(ours)          # one to one, every parameter covered
    wrong = {k: (expected[k], ours[v]) for k, v in name_map.items() if ours[v] != expected[k]}
    assert not wrong
    assert (name_map["backbone_net.model._blocks.3._bn1.running_var"]
            == "backbone_net.model._blocks.3._bn1.moving_variance")
    assert name_map["regressor.bn_list.4.2.weight"] == "regressor.bn_list.4.2.gamma"


@pytest.mark.detector
@pytest.mark.parametrize("size,batch", [(128, 2), (256, 1), (384, 1)])
def test_output_layout(net80, size, batch):
    det = D0Detector(config("d0", input_size=size), 80)
    cell = det.inference_cell(net80)
    assert [p.name for p in cell.get_parameters()][0] == "backbone_net.model._conv_stem.conv.weight"
    net80.set_train(False)
    img = Tensor(np.random.default_rng(size).normal(size=(batch, 3, size, size)).astype(np.float32))
    regression, probs = (o.asnumpy() for o in cell(img))
    num_anchors = 9 * sum((size // 2 ** lv) ** 2 for lv in range(3, 8))
    assert regression.shape == (batch, num_anchors, 4)
    assert probs.shape == (batch, num_anchors, 80)
    assert num_anchors == det.anchors.shape[0]
    assert np.isfinite(regression).all() and (probs > 0).all() and (probs < 1).all()
    # class bias -log(99): untrained scores sit around the 0.01 prior
    assert 0.001 < float(np.median(probs)) < 0.1


@pytest.mark.detector
def test_head_init(net80):
    bias = net80.classifier.header.pointwise_conv.conv.bias.asnumpy()
    np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)
    assert np.all(net80.regressor.header.pointwise_conv.conv.bias.asnumpy() == 0)


def _keras_fan_in(shape: tuple) -> int:
    """Keras ``_compute_fans``: a kernel [kh, kw, in, out] (depthwise: [kh, kw, in, multiplier])."""
    return int(np.prod(shape[:-2])) * shape[-2]


def _torch_fan_in(shape: tuple) -> int:
    """PyTorch ``_calculate_fan_in_and_fan_out``: a weight [out, in / groups, kh, kw]."""
    return shape[1] * int(np.prod(shape[2:]))


@pytest.mark.parametrize("head_init", ["automl", "zylo117"])
def test_head_init_output_std_follows_variance_scaling(head_init):
    """Weights std sqrt(1 / fan_in) with automl's (Keras) or zylo117's (PyTorch) fans; the header's output std
    on unit-variance features is then sqrt(9 / fan_dw x 64 / fan_pw): 1/8 (automl) or 1 (zylo117)."""
    c, anchors, outs = 64, 9, 4
    regressor, classifier = HeadNet(c, anchors, outs, 1, 1), HeadNet(c, anchors, 2, 1, 1)
    init_heads(regressor, classifier, np.random.default_rng(0), head_init)
    fans = _keras_fan_in if head_init == "automl" else _torch_fan_in
    shapes = {"automl": ((3, 3, c, 1), (1, 1, c, anchors * outs)),
              "zylo117": ((c, 1, 3, 3), (anchors * outs, c, 1, 1))}[head_init]
    fan_dw, fan_pw = (fans(s) for s in shapes)
    header = regressor.header
    for conv, fan in ((header.depthwise_conv.conv, fan_dw), (header.pointwise_conv.conv, fan_pw)):
        w = conv.weight.asnumpy()
        assert w.std() == pytest.approx(np.sqrt(1.0 / fan), rel=0.06)
        assert np.abs(w).max() <= 2 * np.sqrt(1.0 / fan) / 0.87962566103423978 + 1e-6    # truncated at 2 std
    x = np.random.default_rng(1).normal(size=(2, c, 34, 34)).astype(np.float32)
    y = header(Tensor(x)).asnumpy()[:, :, 1:-1, 1:-1]                                   # away from the padding
    expected = np.sqrt(9.0 / fan_dw * c / fan_pw)
    assert y.std() == pytest.approx(expected, rel=0.1)
    assert {"automl": 0.125, "zylo117": 1.0}[head_init] == pytest.approx(expected)


@pytest.mark.detector
def test_head_init_reaches_the_network_and_is_checked():
    det = D0Detector(config("d0", input_size=128, head_init="zylo117"), 2)
    w = det.build_network().classifier.header.depthwise_conv.conv.weight.asnumpy()
    assert w.std() == pytest.approx(1 / 3, rel=0.06)
    with pytest.raises(ValueError, match="head_init = 'keras'"):
        EfficientDet(2, head_init="keras")


@pytest.mark.detector
def test_eval_is_deterministic_and_train_drops_connections():
    net = EfficientDet(3, drop_connect_rate=0.5)
    img = Tensor(np.random.default_rng(0).normal(size=(2, 3, 128, 128)).astype(np.float32))
    net.set_train(False)
    a, b = net(img)[0].asnumpy(), net(img)[0].asnumpy()
    np.testing.assert_array_equal(a, b)
    block = net.backbone_net.model._blocks[14]     # a skip block: drop rate 0.5 * 14 / 16
    assert block.use_skip and block.drop_connect_rate == pytest.approx(0.5 * 14 / 16)
    net.set_train(True)
    c, d = net(img)[0].asnumpy(), net(img)[0].asnumpy()   # BN uses batch statistics: only drop connect varies
    assert np.abs(c - d).max() > 1e-3


def test_conv_same_padding_matches_tf_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1, 8, 8)).astype(np.float32)
    conv = Conv2dSame(1, 1, 5, stride=2, bias=False)
    w = conv.conv.weight.asnumpy()[0, 0]
    out = conv(Tensor(x)).asnumpy()[0, 0]
    xp = np.pad(x[0, 0], ((1, 2), (1, 2)))        # total 3 = (4-1)*2 + 5 - 8, extra on bottom/right
    ref = np.array([[np.sum(xp[2 * i:2 * i + 5, 2 * j:2 * j + 5] * w) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_maxpool_same_pads_with_zeros_like_zylo117():
    x = -np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)    # all negative: padding zeros win at the edge
    out = MaxPool2dSame(3, 2)(Tensor(x)).asnumpy()[0, 0]
    xp = np.pad(x[0, 0], ((0, 1), (0, 1)))
    ref = np.array([[xp[2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(2)] for i in range(2)])
    np.testing.assert_array_equal(out, ref)
    assert out[1, 1] == 0 and out[0, 0] == -1


def test_maxpool_same_gradient_is_exact_and_repeatable():
    # Guards the concat-based padding: ops.pad's CPU gradient in MindSpore 2.8 varies between identical calls.
    rng = np.random.default_rng(0)
    x = rng.permutation(64).astype(np.float32).reshape(1, 1, 8, 8) - 32.0   # distinct values, some < 0
    w = rng.normal(size=(1, 1, 4, 4)).astype(np.float32)
    pool, weight = MaxPool2dSame(3, 2), Tensor(w)

    def weighted(t):
        return (pool(t) * weight).sum()

    grad_fn = ms.jit(ms.grad(weighted))
    xp = np.pad(x[0, 0], ((0, 1), (0, 1)))
    ref = np.zeros_like(xp)
    for i in range(4):
        for j in range(4):
            win = xp[2 * i:2 * i + 3, 2 * j:2 * j + 3]
            r, c = np.unravel_index(win.argmax(), win.shape)
            ref[2 * i + r, 2 * j + c] += w[0, 0, i, j]
    for _ in range(3):
        np.testing.assert_allclose(grad_fn(Tensor(x)).asnumpy()[0, 0], ref[:8, :8], rtol=1e-6, atol=1e-6)


def test_upsample_nearest():
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    out = upsample_nearest2x(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(out, x.repeat(2, 2).repeat(2, 3))


def test_batch_norm_is_tf_momentum_and_eps():
    bn = batch_norm(2)
    bn.set_train(True)
    x = np.full((2, 2, 2, 2), 5.0, np.float32)
    bn(Tensor(x))
    np.testing.assert_allclose(bn.moving_mean.asnumpy(), 0.01 * 5.0, rtol=1e-5)   # new = 0.99 old + 0.01 batch
    bn.set_train(False)
    out = bn(Tensor(np.ones((1, 2, 1, 1), np.float32))).asnumpy()
    mean, var = 0.05, bn.moving_variance.asnumpy()
    np.testing.assert_allclose(out.reshape(-1), (1 - mean) / np.sqrt(var + 1e-3), rtol=1e-4)


@pytest.mark.detector
def test_flops(net80):
    tiny = nn.SequentialCell([nn.Conv2d(3, 8, 3, stride=2, pad_mode="same", has_bias=True),
                              nn.Conv2d(8, 8, 3, pad_mode="same", group=8), nn.Flatten(), nn.Dense(8 * 4 * 4, 10)])
    rep = count_flops(tiny, (1, 3, 8, 8))
    assert rep.macs == 8 * 16 * 27 + 8 * 16 * 9 + 128 * 10
    assert rep.gflops == pytest.approx(2 * rep.gmacs)
    rep = count_macs(net80, Tensor(np.zeros((1, 3, 256, 256), np.float32)))
    assert 0.55 < rep.gmacs < 0.66      # 1/4 of the 512 figure (paper/automl: 2.54 B multiply-adds at 512)
    assert len([1 for n, _, _ in rep.layers if n.startswith("classifier")]) == 5 * 8   # 5 levels x 4 sep. convs


# ---------------------------------------------------------------- decode and backbone weights

@pytest.mark.detector
def test_decode_zero_regression_gives_clipped_anchors():
    cfg = config("d0", input_size=128)
    det = D0Detector(cfg, 2)
    a = det.anchors.shape[0]
    scores = np.random.default_rng(0).uniform(size=(1, a, 2)).astype(np.float32)
    boxes, out_scores = det.decode((np.zeros((1, a, 4), np.float32), scores))
    np.testing.assert_allclose(boxes[0], np.clip(efficientdet_anchors(128, cfg.anchor_scale), 0, 128), atol=1e-4)
    np.testing.assert_array_equal(out_scores, scores)


def _backbone_items(net, names_fn):
    return [{"name": names_fn(n), "data": p} for n, p, _ in relative_parameters(net.backbone_net.model)]


def load_pretrained_backbone(net, spec):
    return D0Detector(config("d0", input_size=128), 2).load_pretrained_backbone(net, spec).loaded


@pytest.mark.detector
def test_load_backbone_from_our_and_mindcv_layouts(tmp_path):
    src, dst = EfficientDet(2, seed=1), EfficientDet(2, seed=2)
    ours_path = tmp_path / "b0_ours.ckpt"
    ms.save_checkpoint(_backbone_items(src, lambda n: "model." + n), str(ours_path))
    loaded = load_pretrained_backbone(dst, str(ours_path))
    assert len(loaded) == len(list(src.backbone_net.model.get_parameters())) == 304
    for (n, p, _), (_, q, _) in zip(relative_parameters(src.backbone_net.model),
                                    relative_parameters(dst.backbone_net.model)):
        np.testing.assert_array_equal(p.asnumpy(), q.asnumpy(), err_msg=n)
    # mindcv naming (as mindcv 0.3.0 efficientnet_b0 saves it), plus its unused ImageNet head
    key_map = mindcv_efficientnet_b0_map(src.backbone_net.model)
    mindcv_path = tmp_path / "b0_mindcv.ckpt"
    items = _backbone_items(src, lambda n: key_map[n])
    items.append({"name": "mlp_head.weight", "data": Tensor(np.zeros((1000, 1280), np.float32))})
    ms.save_checkpoint(items, str(mindcv_path))
    third = EfficientDet(2, seed=3)
    load_pretrained_backbone(third, str(mindcv_path))
    np.testing.assert_array_equal(third.backbone_net.model._blocks[7]._se_expand.conv.bias.asnumpy(),
                                  src.backbone_net.model._blocks[7]._se_expand.conv.bias.asnumpy())


@pytest.mark.detector
def test_load_backbone_errors(tmp_path, monkeypatch):
    net = EfficientDet(2)
    assert D0Detector(config("d0", input_size=128), 2).load_pretrained_backbone(net, "none") is None
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_pretrained_backbone(net, str(tmp_path / "nope.ckpt"))
    items = _backbone_items(net, lambda n: n)
    bad = [dict(i) for i in items]
    bad[0] = {"name": bad[0]["name"], "data": Tensor(np.zeros((4, 3, 3, 3), np.float32))}
    ms.save_checkpoint(bad, str(tmp_path / "bad_shape.ckpt"))
    with pytest.raises(ValueError, match=r"_conv_stem\.conv\.weight.*\(4, 3, 3, 3\)"):
        load_pretrained_backbone(net, str(tmp_path / "bad_shape.ckpt"))
    ms.save_checkpoint([i for i in items if "_blocks.5._bn2.gamma" not in i["name"]], str(tmp_path / "short.ckpt"))
    with pytest.raises(ValueError, match=r"_blocks\.5\._bn2\.gamma"):
        load_pretrained_backbone(net, str(tmp_path / "short.ckpt"))
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "MINDCV_EFFICIENTNET_B0", pretrained.PublishedCheckpoint(
        "http://127.0.0.1:9/efficientnet_b0.ckpt", "00000000", 1e-5))
    with pytest.raises(RuntimeError, match="cannot download"):
        load_pretrained_backbone(net, "mindcv")
