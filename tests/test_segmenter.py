"""The segmenter model, its backbone weights, the loss, augmentation and the sample stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from ssr_cli.errors import ConfigError, WeightsError
from ssr_cli.models.backbone_weights import resolve_backbone_state
from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
from ssr_cli.seg.loss import segmentation_loss
from ssr_cli.seg.transforms import random_scale_crop_flip

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "ssr-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("SSR_BACKBONE_WEIGHTS", raising=False)


@pytest.mark.parametrize(
    ("backbone", "head", "stride"),
    [("resnet18", "deeplabv3plus", 16), ("resnet18", "aspp", 8), ("convnext_atto", "deeplabv3plus", 16)],
)
def test_logits_at_input_size(backbone: str, head: str, stride: int) -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(num_classes=5, backbone=backbone, head=head, output_stride=stride, aspp_channels=16)
    model = build_segmenter(cfg).eval()
    x = torch.randn(2, 3, 45, 61)  # odd sizes: the output must still match the input
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5, 45, 61)
    assert torch.isfinite(out).all()
    backbone_params, head_params = model.param_groups()
    assert len(backbone_params) + len(head_params) == len(list(model.parameters()))
    assert {id(p) for p in backbone_params}.isdisjoint(id(p) for p in head_params)


def test_batch_of_one_trains() -> None:
    """The image-pooling branch has no BatchNorm, so one image per process still trains."""
    model = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16)).train()
    loss = segmentation_loss(model(torch.randn(1, 3, 40, 40)), torch.zeros(1, 40, 40, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss)


def test_config_round_trip_and_checks() -> None:
    cfg = SegmenterConfig(num_classes=4, backbone="resnet18", class_names=("bg", "a", "b", "c"))
    assert cfg.aspp_rates == (6, 12, 18)
    again = SegmenterConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="output-stride"):
        SegmenterConfig(num_classes=4, output_stride=12)
    with pytest.raises(ConfigError, match="head"):
        SegmenterConfig(num_classes=4, head="unet")
    with pytest.raises(ConfigError, match="not a timm model"):
        build_segmenter(SegmenterConfig(num_classes=4, backbone="no_such_net"))


def _save_timm_weights(path: Path, name: str, wrap: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = timm.create_model(name, pretrained=False).state_dict()  # full model, classifier included
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if wrap else state, path)
    return state


@pytest.mark.parametrize(
    ("file_name", "wrap"), [("r18.pth", False), ("r18.pth", True), ("r18.safetensors", False)]
)
def test_backbone_weights_from_file_are_loaded(tmp_path: Path, file_name: str, wrap: bool) -> None:
    saved = _save_timm_weights(tmp_path / file_name, "resnet18", wrap)
    state, source = resolve_backbone_state("resnet18", tmp_path / file_name)
    assert source.origin == "flag" and source.sha256
    model = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16), state)
    loaded = model.backbone.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_var"):
        assert torch.equal(loaded[key], saved[key]), key
    # and a model built without them differs (the test can fail)
    fresh = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16))
    assert not torch.equal(fresh.backbone.state_dict()["conv1.weight"], saved["conv1.weight"])


def test_backbone_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    _save_timm_weights(tmp_path / "r18.pth", "resnet18")
    _save_timm_weights(tmp_path / "r34.pth", "resnet34")
    with pytest.raises(WeightsError, match="missing"):
        resolve_backbone_state("resnet34", tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="does not have"):
        resolve_backbone_state("resnet18", tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="not found"):
        resolve_backbone_state("resnet18", tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        resolve_backbone_state("resnet18", tmp_path / "junk.pth")


def test_backbone_weights_from_hub_cache_then_offline_error(tmp_path: Path) -> None:
    state, source = resolve_backbone_state("resnet18", pretrained=False)
    assert state is None and source.is_random
    with pytest.raises(WeightsError, match="--backbone-weights"):
        resolve_backbone_state("resnet18")  # offline, empty caches: a clear error, no download attempt
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    repo = tmp_path / "hf-cache" / ("models--" + hub_id.replace("/", "--"))
    stale = repo / "snapshots" / "0ld"  # an older revision, no longer what refs/main names
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"an old revision that must not be read")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")  # as the hub client writes it
    saved = _save_timm_weights(snapshot / "model.safetensors", "resnet18")
    state, source = resolve_backbone_state("resnet18")
    assert source.origin == "cache" and source.path == snapshot / "model.safetensors"
    assert torch.equal(state["conv1.weight"], saved["conv1.weight"])


@pytest.mark.parametrize("kind", ["balanced", "ce"])
def test_ignored_pixels_do_not_contribute(kind: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :3] = 255
    loss = segmentation_loss(logits, target, kind)
    loss.backward()
    grad = logits.grad.clone()
    assert torch.all(grad.permute(0, 2, 3, 1)[target == 255] == 0)
    assert grad.abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 50  # anything at ignored pixels
    assert torch.allclose(segmentation_loss(changed, target, kind), loss.detach(), atol=1e-6)


def test_balanced_loss_weights_background_and_foreground_halves() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 6)
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, :1, :2] = 2  # 2 foreground pixels, 34 background
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = 0.5 * per_pixel[target == 0].mean() + 0.5 * per_pixel[target != 0].mean()
    assert torch.allclose(segmentation_loss(logits, target, "balanced"), expected)
    assert torch.allclose(segmentation_loss(logits, target, "ce"), per_pixel.mean())
    only_bg = torch.zeros(1, 6, 6, dtype=torch.long)
    bg_mean = torch.nn.functional.cross_entropy(logits, only_bg)
    assert torch.allclose(segmentation_loss(logits, only_bg, "balanced"), bg_mean)


def test_all_ignored_batch_gives_zero_loss_with_graph() -> None:
    logits = torch.randn(1, 3, 5, 5, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 5, 5), 255, dtype=torch.long))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()  # must not raise: DDP needs a backward on every rank
    assert torch.all(logits.grad == 0)


def test_augmentation_keeps_labels_aligned() -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((50, 70), np.uint8)
    label[10:40, 5:30] = 1
    label[20:45, 40:65] = 2
    label[0:5, :] = 255
    colours = np.array([[10, 10, 10], [200, 0, 0], [0, 200, 0]] + [[0, 0, 0]] * 252 + [[0, 0, 255]], np.uint8)
    image = colours[label]
    exact = 0
    for trial in range(20):
        trial_rng = np.random.default_rng([0, trial])
        # scale 1.0: no interpolation, so every labelled pixel must keep its colour exactly
        img, lab = random_scale_crop_flip(image, label, trial_rng, 64, (1.0, 1.0), True, fill=(7, 7, 7))
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
        padded = np.all(img == 7, axis=2)
        assert np.all(lab[padded] == 255)  # padding is ignored, never background
        for cls in (0, 1, 2):
            assert np.all(img[lab == cls] == colours[cls])
        exact += 1
        # random scale: the nearest class colour of each image pixel must match its label
        # (bilinear image vs nearest label differ only along boundaries)
        img, lab = random_scale_crop_flip(image, label, rng, 48, (0.5, 1.5), True)
        distance = np.abs(img[:, :, None, :].astype(int) - colours[None, None, :3].astype(int)).sum(axis=3)
        keep = lab != 255
        assert (distance.argmin(axis=2)[keep] == lab[keep]).mean() > 0.9
    assert exact == 20


def test_sample_stream_is_a_pure_function_of_seed_and_position(tmp_path: Path) -> None:
    from ssr_cli.seg.data import Sample, StreamLayout, TrainStream
    from ssr_cli.seg.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "ds", {"train": 5}, size=(40, 50))
    samples = [Sample(p.stem, p, root / "masks" / p.name) for p in sorted((root / "images").glob("*.png"))]
    a = TrainStream(samples, 4, seed=3, crop_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = TrainStream(samples, 4, seed=3, crop_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    c = TrainStream(samples, 4, seed=4, crop_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    for position in (0, 3, 7, 12):
        xa, ya = a[position]
        xb, yb = b[position]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (3, 32, 32) and ya.dtype == torch.int64
    assert sorted(a.index_at(p) for p in range(5)) == list(range(5))  # an epoch visits every image once
    assert [a.index_at(p) for p in range(10)] != [c.index_at(p) for p in range(10)]
    layout = StreamLayout(batch_size=2, accum=2, world=2)
    rank0 = [p for batch in layout.batches(0, 3, rank=0) for p in batch]
    rank1 = [p for batch in layout.batches(0, 3, rank=1) for p in batch]
    assert set(rank0).isdisjoint(rank1) and sorted(rank0 + rank1) == list(range(24))
    assert list(layout.batches(2, 3, rank=1)) == list(layout.batches(0, 3, rank=1))[4:]


def test_upsampling_puts_features_where_resnets_compute_them() -> None:
    """upsample_aligned's premise: a ResNet stride-s feature (i, j) is centred on pixel (s*i, s*j)."""
    import timm

    torch.manual_seed(0)
    for out_index, stride in ((1, 4), (4, 16)):
        net = timm.create_model(
            "resnet18", features_only=True, out_indices=(out_index,), output_stride=16
        ).eval()
        x = torch.randn(1, 3, 129, 129, requires_grad=True)
        feat = net(x)[0]
        i = feat.shape[2] // 2
        (grad,) = torch.autograd.grad(feat[0, :, i, i].sum(), x)
        weight = grad.abs().sum(dim=(0, 1)).sum(dim=1)
        centre = float((weight * torch.arange(129.0)).sum() / weight.sum())
        assert abs(centre - stride * i) < 1.0, (stride, i, centre)
    from ssr_cli.models.segmenter import upsample_aligned

    grid = torch.randn(1, 2, 5, 4)
    up = upsample_aligned(grid, 4, (19, 16))  # 19 = 4*4+3 rows: the last 2 repeat the edge
    assert up.shape == (1, 2, 19, 16)
    assert torch.allclose(up[:, :, ::4, ::4], grid[:, :, :, :4])
    assert torch.allclose(up[:, :, 17:, 12], grid[:, :, 4:5, 3].expand(-1, -1, 2))


def _bn_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_deeplabv2_head_is_four_summed_dilated_classifiers_at_stride_8() -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(num_classes=5, backbone="resnet18", head="deeplabv2", output_stride=8)
    assert cfg.aspp_rates == (6, 12, 18, 24)
    model = build_segmenter(cfg).eval()
    branches = list(model.head.branches)
    assert len(branches) == 4 and not _bn_layers(model.head)
    for conv, rate in zip(branches, (6, 12, 18, 24), strict=True):
        assert isinstance(conv, torch.nn.Conv2d)
        assert conv.kernel_size == (3, 3) and conv.dilation == (rate, rate) and conv.padding == (rate, rate)
        assert conv.out_channels == 5 and conv.in_channels == 512 and conv.bias is not None
        assert torch.all(conv.bias == 0) and 0.005 < float(conv.weight.detach().std()) < 0.015  # N(0, 0.01)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        feats = model.backbone(x)
        assert feats[-1].shape[2:] == (8, 10)  # output stride 8
        summed = sum(conv(feats[-1]) for conv in branches)
        assert torch.allclose(model.head(feats), summed, atol=1e-6)
        for conv in branches:  # each branch matters: the sum is not one branch
            assert not torch.allclose(summed, conv(feats[-1]), atol=1e-3)
        assert model(x).shape == (1, 5, 64, 80)


def _sgd(model: torch.nn.Module, head: str, **flags: object) -> torch.optim.Optimizer:
    from ssr_cli.seg.recipes import fill_defaults
    from ssr_cli.seg.train import TrainConfig, build_optimizer

    tdict, _, _ = fill_defaults(head, dict(flags), None)
    cfg = TrainConfig(**tdict)
    if cfg.freeze_bn:
        model.freeze_batchnorm()  # type: ignore[operator]
    return build_optimizer(model, cfg)


def test_frozen_batchnorm_keeps_statistics_and_gets_no_gradients() -> None:
    torch.manual_seed(0)
    model = build_segmenter(
        SegmenterConfig(num_classes=3, backbone="resnet18", head="deeplabv2", output_stride=8)
    )
    optimizer = _sgd(model, "deeplabv2", lr=0.1)  # a large step: any change would show
    model.eval()
    model.train()  # train() after eval() must not unfreeze BatchNorm (validation does this)
    assert model.training and all(not bn.training for bn in _bn_layers(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = segmentation_loss(model(torch.randn(2, 3, 48, 48) * 3 + 1), torch.randint(0, 3, (2, 48, 48)))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    bns = _bn_layers(model)
    assert bns
    for bn in bns:
        assert bn.weight.grad is None and bn.bias.grad is None and not bn.weight.requires_grad
    bn_keys = [k for k in before if any(s in k for s in ("running_", "num_batches", "bn", "downsample.1"))]
    assert bn_keys
    for key in bn_keys:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert not torch.equal(before["head.branches.0.bias"], after["head.branches.0.bias"])

    # and the V3+ recipe trains BatchNorm: the same step moves its statistics (the test can fail)
    torch.manual_seed(0)
    v3 = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16)).train()
    _sgd(v3, "deeplabv3plus")
    mean0 = v3.backbone.bn1.running_mean.clone()
    v3(torch.randn(2, 3, 48, 48) * 3 + 1)
    assert not torch.equal(mean0, v3.backbone.bn1.running_mean) and v3.backbone.bn1.weight.requires_grad


def _groups(optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float, float]]:
    return {g["name"]: (g["lr_mult"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups}


def test_optimizer_groups_multipliers_and_weight_decay() -> None:
    v2 = build_segmenter(
        SegmenterConfig(num_classes=3, backbone="resnet18", head="deeplabv2", output_stride=8)
    )
    groups = _groups(_sgd(v2, "deeplabv2"))
    # resnet convolutions have no biases and frozen BatchNorm is not optimised: three groups, as in DeepLabV2
    assert groups == {
        "backbone.weight": (1.0, 2.5e-4, 5e-4),
        "head.weight": (10.0, 2.5e-3, 5e-4),
        "head.bias": (20.0, 5e-3, 0.0),
    }
    v3 = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16))
    optimizer = _sgd(v3, "deeplabv3plus")
    groups = _groups(optimizer)
    assert groups == {
        "backbone.weight": (1.0, 1e-3, 1e-4),
        "backbone.norm": (1.0, 1e-3, 0.0),
        "head.weight": (10.0, 1e-2, 1e-4),
        "head.bias": (10.0, 1e-2, 0.0),
        "head.norm": (10.0, 1e-2, 0.0),
    }
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in v3.parameters())  # every parameter, once
    head_bn = {id(p) for m in _bn_layers(v3.head) for p in m.parameters()}
    (norm_group,) = [g for g in optimizer.param_groups if g["name"] == "head.norm"]
    assert {id(p) for p in norm_group["params"]} == head_bn
    # explicit flags win over the recipe
    fresh = build_segmenter(SegmenterConfig(num_classes=3, backbone="resnet18", aspp_channels=16))
    groups = _groups(_sgd(fresh, "deeplabv3plus", norm_decay=True, bias_decay=True, head_bias_lr_mult=20.0))
    assert groups["backbone.norm"][2] == 1e-4 and groups["head.bias"] == (20.0, 2e-2, 1e-4)


def test_recipe_defaults_depend_on_the_head_and_given_flags_win() -> None:
    from ssr_cli.seg.recipes import fill_defaults

    unset = dict.fromkeys(
        ("lr", "weight_decay", "head_lr_mult", "head_bias_lr_mult", "freeze_bn", "momentum")
    )
    v2, stride, record = fill_defaults("deeplabv2", {**unset, "optimizer": "sgd"}, None)
    assert stride == 8 and record["source"].startswith("kazuto1011/deeplab-pytorch")
    assert (v2["lr"], v2["weight_decay"], v2["head_lr_mult"], v2["head_bias_lr_mult"]) == (
        2.5e-4,
        5e-4,
        10,
        20,
    )
    assert v2["freeze_bn"] is True and v2["bias_decay"] is False and v2["momentum"] == 0.9
    v3, stride, record = fill_defaults("deeplabv3plus", {**unset, "optimizer": "sgd"}, None)
    assert stride == 16 and record["source"] == "VainF/DeepLabV3Plus-Pytorch"
    assert (v3["lr"], v3["lr"] * v3["head_lr_mult"], v3["weight_decay"]) == (1e-3, 1e-2, 1e-4)
    assert v3["freeze_bn"] is False and v3["norm_decay"] is False and v3["bias_decay"] is False
    given = {**unset, "lr": 0.05, "freeze_bn": False, "weight_decay": 0.0}
    mine, stride, record = fill_defaults("deeplabv2", given, 16)
    assert (mine["lr"], mine["freeze_bn"], mine["weight_decay"], stride) == (0.05, False, 0.0, 16)
    assert mine["head_bias_lr_mult"] == 20  # the rest still from the recipe
    assert {"lr", "freeze_bn", "weight_decay", "output_stride"} <= set(record["given"])
    assert "lr" not in record["from_recipe"] and "head_bias_lr_mult" in record["from_recipe"]
    # a given --head-lr-mult alone: the biases keep the recipe's ratio (2x for DeepLabV2, 1x for V3+)
    assert fill_defaults("deeplabv2", {**unset, "head_lr_mult": 1.0}, None)[0]["head_bias_lr_mult"] == 2.0
    assert fill_defaults("deeplabv3plus", {**unset, "head_lr_mult": 1.0}, None)[0]["head_bias_lr_mult"] == 1.0
    adamw, _, record = fill_defaults("deeplabv2", {**unset, "optimizer": "adamw"}, None)
    assert (adamw["lr"], adamw["weight_decay"], adamw["freeze_bn"]) == (6e-5, 0.01, True)
    with pytest.raises(ConfigError, match="--head 'unet'"):
        fill_defaults("unet", {}, None)
