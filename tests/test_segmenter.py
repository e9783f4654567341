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
