"""ImageNet starts compute what their authors trained: our backbones loaded from mindcv 0.3.0's own models
(random weights, randomised BatchNorm statistics with variances far below 1e-3, saved by mindcv's cell), from a
torchvision-layout ShuffleNetV2 file and from our own checkpoints, compared feature by feature in eval mode.

Run with ``-s`` to print the measured differences (README: "ImageNet starts").
"""
from __future__ import annotations

import hashlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.config import D0Config
from msdet.conversion import pretrained
from msdet.conversion.naming import mindcv_efficientnet_b0_map, mindcv_shufflenet_v2_key, relative_parameters
from msdet.detectors.d0 import D0Detector
from msdet.detectors.nanodet import NanoDetDetector
from msdet.engine.checkpoint import save_weights
from msdet.models.efficientdet import EfficientDet
from msdet.models.nanodet_plus import NanoDetPlus
from msdet.models.shufflenetv2 import ShuffleNetV2, channel_shuffle
from msdet.training import check_starting_weights_tracked
from tests.helpers import config, official_state_dict, write_torch_state

TOL = 1e-5


@pytest.fixture(scope="module")
def mindcv_models():
    return pytest.importorskip("mindcv.models")  # pinned test dependency (Makefile: mindcv==0.3.0)


pytestmark = pytest.mark.usefixtures("pynative")


def randomise_bn(cell: nn.Cell, seed: int) -> None:
    """BN statistics as a trained net might have them: variances log-uniform in [1e-6, 2] (a third below 1e-3),
    gamma scaled with sqrt(var) so near-constant channels stay of ordinary size; conv biases random too."""
    rng = np.random.default_rng(seed)
    for _, c in cell.cells_and_names():
        if isinstance(c, nn.BatchNorm2d):
            n = c.gamma.shape[0]
            var = np.exp(rng.uniform(np.log(1e-6), np.log(2.0), n))
            c.moving_variance.set_data(Tensor(var.astype(np.float32)))
            c.moving_mean.set_data(Tensor(rng.normal(0, 0.2, n).astype(np.float32)))
            scale = rng.uniform(0.5, 1.5, n) * np.sqrt(var + 1e-5) / np.sqrt(var.mean() + 1e-5)
            c.gamma.set_data(Tensor(scale.astype(np.float32)))
            c.beta.set_data(Tensor(rng.normal(0, 0.2, n).astype(np.float32)))
        elif isinstance(c, nn.Conv2d) and c.bias is not None:
            c.bias.set_data(Tensor(rng.normal(0, 0.2, c.bias.shape).astype(np.float32)))


def rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the scale-free error of a feature map."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def weights_file(root, cfg) -> str:
    """``cfg.pretrained_backbone`` under ``root``, checked by the train stage's rule for starting files."""
    check_starting_weights_tracked(cfg, "d0" if isinstance(cfg, D0Config) else "nanodet", root)
    (root / "weights").mkdir(exist_ok=True)
    return str(root / cfg.pretrained_backbone)


def _image(shape, seed=0) -> Tensor:
    return Tensor(np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# D0: mindcv's efficientnet_b0


def random_mindcv_model(mindcv_models, name: str, seed: int) -> nn.Cell:
    """mindcv's own model with random weights and randomised BN statistics, in eval mode."""
    ms.set_seed(seed)
    ref = mindcv_models.create_model(name)
    randomise_bn(ref, seed)
    ref.set_train(False)
    return ref


@pytest.fixture(scope="module")
def mindcv_b0(mindcv_models):
    return random_mindcv_model(mindcv_models, "efficientnet_b0", 0)


def mindcv_b0_features(ref, x: Tensor) -> list[np.ndarray]:
    """mindcv's intermediate outputs at strides 8/16/32: after features.5 / .7 / .9 (stages 2, 4, 6)."""
    out, h = [], x
    for i, layer in enumerate(ref.features):
        h = layer(h)
        if i in (5, 7, 9):
            out.append(h.asnumpy())
    return out


def test_pinned_mindcv_constants_are_mindcv_s(mindcv_models):
    """The URL, hash fragment and BN eps we pin are those of the installed mindcv 0.3.0."""
    from mindcv.models import efficientnet, shufflenetv2

    for published, cfg, model in ((pretrained.MINDCV_EFFICIENTNET_B0, efficientnet.default_cfgs["efficientnet_b0"],
                                   "efficientnet_b0"),
                                  (pretrained.MINDCV_SHUFFLENET_V2_X1_0,
                                   shufflenetv2.default_cfgs["shufflenet_v2_x1_0"], "shufflenet_v2_x1_0")):
        assert published.url == cfg["url"]
        assert published.url.endswith(f"-{published.sha256_prefix}.ckpt")
        eps = {c.eps for _, c in mindcv_models.create_model(model).cells_and_names() if isinstance(c, nn.BatchNorm2d)}
        assert eps == {published.bn_eps}


@pytest.mark.detector
def test_d0_backbone_from_mindcv_b0_computes_mindcv_features(mindcv_b0, tmp_path):
    cfg = config("d0", input_size=128, pretrained_backbone="weights/efficientnet_b0.ckpt")
    path = weights_file(tmp_path, cfg)
    ms.save_checkpoint(mindcv_b0, path)
    net = EfficientDet(2)
    load = D0Detector(cfg, 2).load_pretrained_backbone(net, path)
    assert load.layout == "mindcv" and len(load.loaded) == 304 and not load.kept_initialisation
    assert "gamma of 48 BatchNorm cells" in load.adaptations[0] and "1e-05" in load.adaptations[0]
    net.set_train(False)
    x = _image((1, 3, 128, 128))
    ours = [f.asnumpy() for f in net.backbone_net.model(x)]
    ref = mindcv_b0_features(mindcv_b0, x)
    diffs = {name: rel_diff(a, b) for name, a, b in zip(("C3", "C4", "C5"), ours, ref)}
    print(f"\nD0 <- mindcv efficientnet_b0, max|diff|/max|ref|: {diffs}")
    assert [a.shape for a in ours] == [b.shape for b in ref] == [(1, 40, 16, 16), (1, 112, 8, 8), (1, 320, 4, 4)]
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.detector
def test_our_d0_checkpoint_is_loaded_as_trained(tmp_path):
    """Our own D0 checkpoint (trained with eps 1e-3): tensors copied unchanged, no eps fold, same features."""
    src = EfficientDet(2, seed=1)
    randomise_bn(src, 1)
    (tmp_path / "weights").mkdir()
    save_weights(tmp_path / "weights" / "d0.ckpt", src)
    dst = EfficientDet(2, seed=2)
    load = D0Detector(config("d0", input_size=128), 2).load_pretrained_backbone(dst, str(tmp_path / "weights/d0.ckpt"))
    assert load.layout == "msdet" and load.adaptations == [] and len(load.loaded) == 304
    for (n, p, _), (_, q, _) in zip(relative_parameters(src.backbone_net.model),
                                    relative_parameters(dst.backbone_net.model)):
        np.testing.assert_array_equal(p.asnumpy(), q.asnumpy(), err_msg=n)
    src.set_train(False)
    dst.set_train(False)
    x = _image((1, 3, 128, 128), 1)
    for a, b in zip(dst.backbone_net.model(x), src.backbone_net.model(x)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_fold_bn_eps_is_exact_per_channel():
    var = np.array([1e-7, 1e-5, 1e-3, 1.0, 50.0], np.float32)
    gamma = np.array([0.3, -1.2, 2.0, 0.7, 1.0], np.float32)
    folded = pretrained.fold_bn_eps(gamma, var, 1e-5, 1e-3)
    np.testing.assert_allclose(folded / np.sqrt(var.astype(np.float64) + 1e-3),
                               gamma / np.sqrt(var.astype(np.float64) + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(pretrained.fold_bn_eps(gamma, var, 1e-3, 1e-3), gamma)


# ----------------------------------------------------------------------------------------------------
# NanoDet: mindcv's shufflenet_v2_x1_0 (Megvii variant) and torchvision's layout


@pytest.fixture(scope="module")
def mindcv_shufflenet(mindcv_models):
    return random_mindcv_model(mindcv_models, "shufflenet_v2_x1_0", 2)


@pytest.fixture(scope="module")
def mindcv_shufflenet_file(mindcv_shufflenet, tmp_path_factory):
    cfg = config("nanodet", input_size=128, pretrained_backbone="weights/shufflenet_v2_x1_0.ckpt")
    path = weights_file(tmp_path_factory.mktemp("starts"), cfg)
    ms.save_checkpoint(mindcv_shufflenet, path)
    return path


def test_shufflenet_blocks_from_mindcv_compute_mindcv_blocks(mindcv_shufflenet, mindcv_shufflenet_file):
    """Every block whose shapes agree computes mindcv's block up to its channel routing: with ReLU (mindcv's
    activation), ours(x) == shuffle(mindcv(x)) for stride 2 and shuffle(mindcv(shuffle(x))) for stride 1
    (mindcv splits even/odd channels before a block, torchvision halves and shuffles after)."""
    ours = ShuffleNetV2(activation="ReLU")
    load = pretrained.load_shufflenet_v2(ours, mindcv_shufflenet_file)
    assert load.layout == "mindcv" and load.adaptations == []
    assert sorted(load.kept_initialisation) == sorted(
        f"stage2.0.{m}" for m in ("branch1.2.weight", "branch1.3.gamma", "branch1.3.beta", "branch1.3.moving_mean",
                                  "branch1.3.moving_variance", "branch2.5.weight", "branch2.6.gamma",
                                  "branch2.6.beta", "branch2.6.moving_mean", "branch2.6.moving_variance"))
    ours.set_train(False)
    x = _image((1, 3, 32, 32), 2)
    diffs = {"conv1": rel_diff(ours.conv1(x).asnumpy(), mindcv_shufflenet.first_conv(x).asnumpy())}
    blocks = [b for stage in (ours.stage2, ours.stage3, ours.stage4) for b in stage]
    for k, (mine, theirs) in enumerate(zip(blocks, mindcv_shufflenet.features)):
        if k == 0:
            continue  # stage2.0: other shapes
        cin = theirs.branch_main[0].in_channels * (1 if theirs.stride == 2 else 2)
        h = _image((1, cin, 8, 8), 10 + k)
        ref = theirs(h) if theirs.stride == 2 else theirs(channel_shuffle(h, 2))
        diffs[f"features.{k}"] = rel_diff(mine(h).asnumpy(), channel_shuffle(ref, 2).asnumpy())
    print(f"\nShuffleNetV2 (ReLU) blocks <- mindcv, max|diff|/max|ref|: max {max(diffs.values()):.2e}")
    assert len(diffs) == 16 and max(diffs.values()) < TOL, diffs


def _mindcv_stage_outputs(ref, x: Tensor) -> list[np.ndarray]:
    """mindcv's stage outputs (after features.3 / .11 / .15) in torchvision's channel order (shuffled)."""
    h, out = ref.max_pool(ref.first_conv(x)), []
    for i, block in enumerate(ref.features):
        h = block(h)
        if i in (3, 11, 15):
            out.append(channel_shuffle(h, 2).asnumpy())
    return out


@pytest.mark.detector
def test_nanodet_backbone_from_mindcv_is_approximate(mindcv_shufflenet, mindcv_shufflenet_file):
    """NanoDet's backbone is not mindcv's function (stage2.0 shapes, channel routing, LeakyReLU, max-pool
    padding): every tensor that fits is mindcv's, bit for bit; the stage outputs differ by the measured amount."""
    net = NanoDetPlus(3)
    load = NanoDetDetector(config("nanodet", input_size=128), 3).load_pretrained_backbone(net, mindcv_shufflenet_file)
    theirs = {p.name: p.asnumpy() for p in mindcv_shufflenet.get_parameters()}
    same = [np.array_equal(p.asnumpy(), theirs[mindcv_shufflenet_v2_key(n)])
            for n, p, _ in relative_parameters(net.backbone) if n not in load.kept_initialisation]
    assert len(same) == len(load.loaded) == 265 and all(same)
    net.set_train(False)
    x = _image((1, 3, 128, 128), 3)
    ref = _mindcv_stage_outputs(mindcv_shufflenet, x)
    diffs = {}
    for activation in ("LeakyReLU", "ReLU"):
        ours = ShuffleNetV2(activation=activation)
        pretrained.load_shufflenet_v2(ours, mindcv_shufflenet_file)
        ours.set_train(False)
        feats = [f.asnumpy() for f in ours(x)]
        diffs[activation] = [round(rel_diff(a, b), 3) for a, b in zip(feats, ref)]
    print(f"\nNanoDet ShuffleNetV2 <- mindcv, stage 2/3/4 max|diff|/max|ref|: {diffs}")
    assert min(diffs["LeakyReLU"] + diffs["ReLU"]) > 0.05  # documented as approximate: if this fails, re-measure


@pytest.mark.detector
@pytest.mark.parametrize("name", ["shufflenetv2_x1-5666bf0f80.pth", "shufflenetv2_x1.ckpt"])
def test_nanodet_backbone_from_torchvision_layout(tmp_path, name):
    """torchvision's published shufflenet_v2_x1_0 keys and shapes (conv5, fc and num_batches_tracked included),
    as a torch.save file (NanoDet's official start, read without torch) or a MindSpore checkpoint: every
    backbone tensor is the file's, nothing folded, nothing left at its initialisation."""
    listing = official_state_dict("torchvision_shufflenet_v2_x1_0")
    rng = np.random.default_rng(4)
    state = {k: (rng.normal(0, 1, shape).astype(np.float32) if dtype == "float32" else np.array(7, np.int64))
             for k, (shape, dtype) in listing.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = np.abs(state[k]) + 1e-6
    (tmp_path / "weights").mkdir()
    path = tmp_path / "weights" / name
    if path.suffix == ".pth":
        write_torch_state(path, state)
    else:
        ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in state.items()], str(path))
    net = NanoDetPlus(3)
    load = NanoDetDetector(config("nanodet", input_size=128), 3).load_pretrained_backbone(net, str(path))
    assert load.layout == "torchvision" and load.adaptations == [] and load.kept_initialisation == []
    torch_name = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
    got = {}
    for local, p, cell in relative_parameters(net.backbone):
        head, leaf = local.rsplit(".", 1)
        got[f"{head}.{torch_name[leaf]}" if isinstance(cell, nn.BatchNorm2d) else local] = p.asnumpy()
    assert len(got) == 275 and set(got) == {k for k in listing if not k.startswith(("conv5.", "fc."))
                                            and not k.endswith("num_batches_tracked")}
    for k, v in got.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


@pytest.mark.detector
def test_our_nanodet_checkpoint_is_loaded_as_trained(tmp_path):
    src = NanoDetPlus(3)
    randomise_bn(src.backbone, 5)
    (tmp_path / "weights").mkdir()
    save_weights(tmp_path / "weights" / "nanodet.ckpt", src)
    dst = NanoDetPlus(3)
    load = NanoDetDetector(config("nanodet", input_size=128), 3).load_pretrained_backbone(
        dst, str(tmp_path / "weights/nanodet.ckpt"))
    assert load.layout == "msdet" and load.adaptations == [] and len(load.loaded) == 275
    src.set_train(False)
    dst.set_train(False)
    x = _image((1, 3, 64, 64), 5)
    for a, b in zip(dst.backbone(x), src.backbone(x)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


# ----------------------------------------------------------------------------------------------------
# the "mindcv" download: SHA-256 checked against the pin before the file enters the cache and before use


def _published(tmp_path, data: bytes, pin: str | None = None) -> pretrained.PublishedCheckpoint:
    src = tmp_path / "served" / "efficientnet_b0-x.ckpt"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return pretrained.PublishedCheckpoint(src.as_uri(), pin or digest[:8], 1e-5)


def test_download_is_verified_before_it_enters_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    data = np.random.default_rng(6).bytes(3 << 20)
    published = _published(tmp_path, data)
    path, digest = pretrained.cached_download(published, "d0.pretrained_backbone")
    assert path == tmp_path / "cache" / "efficientnet_b0-x.ckpt" and path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest() and len(digest) == 64  # the full digest, to pin the file
    (tmp_path / "served" / "efficientnet_b0-x.ckpt").unlink()  # the second call does not download
    assert pretrained.cached_download(published, "d0.pretrained_backbone") == (path, digest)
    # a cached file that no longer matches is refused, not used
    path.write_bytes(data[:-1])
    with pytest.raises(pretrained.IntegrityError, match=r"efficientnet_b0-x\.ckpt.*SHA-256 .* pinned .*delete it"):
        pretrained.cached_download(published, "d0.pretrained_backbone")


def test_download_with_another_digest_never_reaches_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    data = b"not the published checkpoint" * 1000
    wrong = "0" * 8 if not hashlib.sha256(data).hexdigest().startswith("0" * 8) else "f" * 8
    published = _published(tmp_path, data, wrong)
    with pytest.raises(pretrained.IntegrityError, match=rf"has SHA-256 {hashlib.sha256(data).hexdigest()}.*{wrong}"):
        pretrained.cached_download(published, "d0.pretrained_backbone")
    assert not (tmp_path / "cache" / "efficientnet_b0-x.ckpt").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no temporary left behind


@pytest.mark.detector
def test_d0_mindcv_spec_downloads_verifies_and_loads(tmp_path, monkeypatch):
    """``pretrained_backbone: mindcv`` end to end, from a local URL standing in for download.mindspore.cn."""
    src = EfficientDet(2, seed=7)
    names = mindcv_efficientnet_b0_map(src.backbone_net.model)
    blob = tmp_path / "blob.ckpt"
    ms.save_checkpoint([{"name": names[n], "data": p} for n, p, _ in relative_parameters(src.backbone_net.model)],
                       str(blob))
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "MINDCV_EFFICIENTNET_B0", _published(tmp_path, blob.read_bytes()))
    dst = EfficientDet(2, seed=8)
    load = D0Detector(config("d0", input_size=128), 2).load_pretrained_backbone(dst, "mindcv")
    assert load.layout == "mindcv" and load.source == str(tmp_path / "cache" / "efficientnet_b0-x.ckpt")
    # the model card carries the full SHA-256 of the verified file, not only the pinned 8 hex digits
    assert load.card()["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    np.testing.assert_array_equal(dst.backbone_net.model._blocks[3]._project_conv.conv.weight.asnumpy(),
                                  src.backbone_net.model._blocks[3]._project_conv.conv.weight.asnumpy())
