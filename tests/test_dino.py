"""DINO / DINOv2 (timm): weights in the original and timm layouts, attention, preprocessing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ssr_cli.errors import ConfigError, WeightsError
from ssr_cli.models.dino import (
    IMAGENET_MEAN,
    build_dino,
    dino_attention,
    load_dino,
    preprocess,
    timm_block_attention,
)

pytestmark = pytest.mark.timeout(60)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """No weights anywhere but where a test puts them; the hub is offline."""
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "ssr-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SSR_DINO_WEIGHTS", raising=False)


def sample_input(h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_tiny_vit_loads_from_every_layout_with_identical_attention(tmp_path):
    source = build_dino("dino_vits16", seed=1, arch_overrides=TINY).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    # the facebookresearch/dino key layout is timm's: check the keys named in DINO's files
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "norm.weight",
    ):
        assert key in state
    files = {}
    files["dino.pth"] = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, files["dino.pth"])
    files["full.pth"] = tmp_path / "checkpoint.pth"  # DINO's training checkpoint: use the teacher
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.randn(64, 32)
    teacher["head.last_layer.weight_g"] = torch.randn(1, 64)
    student = {f"module.backbone.{k}": v + 1.0 for k, v in state.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, files["full.pth"])
    files["timm.safetensors"] = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["timm.safetensors"]))
    files["wrapped.bin"] = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, files["wrapped.bin"])

    x = sample_input()
    want = dino_attention(source, x)
    for name, path in files.items():
        dino = load_dino("dino_vits16", str(path), arch_overrides=TINY)
        assert dino.source.origin == "flag" and dino.source.sha256, name
        assert torch.equal(dino.attention(x), want), name
    other = load_dino("dino_vits16", "random", seed=0, arch_overrides=TINY)
    assert other.is_random and other.describe()["weights"]["origin"] == "random"
    assert not torch.allclose(other.attention(x), want)


def test_dinov2_original_layout_and_registers(tmp_path):
    source = build_dino("dinov2_vits14", seed=2, arch_overrides=TINY).eval()
    state = dict(source.state_dict())
    assert "blocks.0.ls1.gamma" in state
    state["mask_token"] = torch.zeros(1, 32)  # in DINOv2's own files, not in timm's model
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    dino = load_dino("dinov2_vits14", str(path), arch_overrides=TINY)
    assert dino.patch_size == 14
    x = sample_input(42, 56)
    assert torch.equal(dino.attention(x), dino_attention(source, x))
    assert dino.attention(x).shape == (1, 12, 12)

    reg = build_dino("dinov2_vits14_reg4", arch_overrides=TINY).eval()
    assert reg.num_prefix_tokens == 5
    caught = {}
    reg.blocks[-1].attn.register_forward_pre_hook(lambda m, args: caught.setdefault("x", args[0]))
    with torch.no_grad():
        reg(x)
    full = timm_block_attention(reg.blocks[-1].attn, caught["x"])
    assert full.shape == (1, 5 + 12, 5 + 12)
    assert torch.allclose(dino_attention(reg, x), full[:, 5:, 5:], atol=1e-6)


def test_recomputed_attention_reproduces_the_blocks_output():
    model = build_dino("dino_vits16", seed=3, arch_overrides=TINY).eval()
    x = sample_input(64, 80)
    inputs, outputs = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args[0]))
        blk.attn.register_forward_hook(lambda m, args, out, i=i: outputs.setdefault(i, out))
    with torch.no_grad():
        model.forward_features(x)
    for i, blk in enumerate(model.blocks):
        attn, tokens = blk.attn, inputs[i]
        n, length, width = tokens.shape
        probs = timm_block_attention(attn, tokens, average_heads=False)  # [N, heads, L, L]
        assert probs.shape == (1, 2, length, length)
        assert torch.allclose(probs.sum(-1), torch.ones(1, 2, length), atol=1e-5)
        v = attn.qkv(tokens).reshape(n, length, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(n, length, width)
        assert torch.allclose(attn.proj(attn.norm(mixed)), outputs[i], atol=1e-5)
    both = dino_attention(model, x, blocks=(0, -1))
    want = torch.stack(
        [timm_block_attention(model.blocks[i].attn, inputs[i])[:, 1:, 1:] for i in (0, 1)]
    ).mean(0)
    assert both.shape == (1, 20, 20) and torch.allclose(both, want, atol=1e-6)
    assert not torch.allclose(dino_attention(model, x, blocks=(0,)), dino_attention(model, x, blocks=(1,)))
    bf16 = dino_attention(model, x, precision="bf16")
    assert torch.allclose(bf16, dino_attention(model, x), atol=2e-2)
    with pytest.raises(ConfigError):
        dino_attention(model, x, blocks=(5,))
    with pytest.raises(ValueError):
        dino_attention(model, sample_input(50, 64))


def test_odd_image_sizes_and_imagenet_normalisation():
    dino = load_dino("dino_vits16", "random", arch_overrides=TINY)
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    x = dino.preprocess(image)
    assert x.shape == (3, 48, 64)
    attn = dino.attention(x[None])
    assert attn.shape == (1, 12, 12) and torch.isfinite(attn).all()
    assert (attn.sum(-1) < 1).all() and (attn.sum(-1) > 0.5).all()  # the CLS column is dropped
    v2 = load_dino("dinov2_vits14", "random", arch_overrides=TINY)
    x2 = v2.preprocess(image)
    assert x2.shape == (3, 42, 56) and v2.attention(x2[None]).shape == (1, 12, 12)
    on_clip_grid = v2.preprocess(np.zeros((375, 500, 3), np.uint8), grid_hw=(24, 32))
    assert on_clip_grid.shape == (3, 24 * 14, 32 * 14)
    grey = np.tile(np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8), (20, 30, 1))
    assert preprocess(grey, 16).abs().max() < 0.01


def test_grid_attention_on_clips_grid():
    image = np.random.default_rng(1).integers(0, 256, (50, 61, 3), dtype=np.uint8)
    clip_grid = (4, 4)  # ceil(50 / 16), ceil(61 / 16)
    v1 = load_dino("dino_vits16", "random", arch_overrides=TINY)
    same = v1.grid_attention(image, clip_grid)
    assert torch.equal(same, v1.attention(v1.preprocess(image, grid_hw=clip_grid)[None])[0])
    v2 = load_dino("dinov2_vits14", "random", arch_overrides=TINY)
    resampled = v2.grid_attention(image, clip_grid)  # runs at 56 x 70 (a 4 x 5 grid), then resampled
    assert resampled.shape == (16, 16)
    assert torch.allclose(resampled.sum(dim=1), torch.ones(16), atol=1e-5)
    direct = v2.grid_attention(image, clip_grid, resample=False)  # runs at 56 x 56
    assert direct.shape == (16, 16) and not torch.allclose(direct, resampled)


def test_bad_files_fail_with_the_file_named(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(build_dino("dino_vits16", arch_overrides=TINY).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    for path in (truncated, garbage):
        with pytest.raises(WeightsError, match="cannot read DINO weights") as err:
            load_dino("dino_vits16", str(path), arch_overrides=TINY)
        assert str(path) in str(err.value)
    with pytest.raises(WeightsError, match="do not fit") as err:
        load_dino("dino_vits16", str(good), arch_overrides=TINY | {"depth": 3})
    assert str(good) in str(err.value) and "missing" in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        load_dino("dino_vits16", str(tmp_path / "nowhere.pth"), arch_overrides=TINY)
    with pytest.raises(ConfigError, match="unknown DINO model"):
        load_dino("dino_vitl99", "random")


def test_env_cache_and_fast_offline_failure(tmp_path, monkeypatch):
    state = build_dino("dino_vits16", seed=4, arch_overrides=TINY).state_dict()
    env_file = tmp_path / "from-env.pth"
    torch.save(state, env_file)
    monkeypatch.setenv("SSR_DINO_WEIGHTS", str(env_file))
    assert load_dino("dino_vits16", arch_overrides=TINY).source.origin == "env"
    monkeypatch.delenv("SSR_DINO_WEIGHTS")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="offline") as err:
        load_dino("dino_vitb16")
    assert time.perf_counter() - start < 5
    assert "dino_vitbase16_pretrain.pth" in str(err.value) and "--dino-weights" in str(err.value)
    cached = Path(tmp_path / "ssr-cache" / "weights" / "dino" / "dino_deitsmall16_pretrain.pth")
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    dino = load_dino("dino_vits16", arch_overrides=TINY)
    assert dino.source.origin == "cache" and dino.source.path == cached
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth"
    hub.parent.mkdir(parents=True)
    torch.save(build_dino("dino_vitb16", arch_overrides=TINY).state_dict(), hub)
    assert load_dino("dino_vitb16", arch_overrides=TINY).source.path == hub


def test_clip_and_dino_answer_the_same_attention_calls():
    """One interface (models/attention.py): callers never branch on the model type."""
    from tinymodels import register_tiny_clip

    from ssr_cli.errors import ConfigError
    from ssr_cli.models.attention import block_indices, parse_blocks
    from ssr_cli.models.clip import load_clip

    assert parse_blocks("8", "--clip-blocks") == 8 and parse_blocks("-1", "--dino-blocks") == (-1,)
    assert parse_blocks("-2,-1", "--x") == (-2, -1) and parse_blocks("0", "--x") == (0,)
    with pytest.raises(ConfigError, match="--dino-blocks 'a'"):
        parse_blocks("a", "--dino-blocks")
    assert block_indices(8, 12) == list(range(4, 12)) and block_indices(8, 3) == [0, 1, 2]
    assert block_indices((-1, 0), 4) == [0, 3]
    with pytest.raises(ConfigError, match="outside the model's 4 blocks"):
        block_indices((4,), 4)

    images = [np.random.default_rng(i).integers(0, 256, (50, 61, 3), dtype=np.uint8) for i in range(2)]
    grid = (4, 4)
    dino = load_dino("dino_vits16", "random", arch_overrides=TINY)
    clip = load_clip(register_tiny_clip(), "random")
    for model in (clip, dino):
        assert model.resized_size(50, 61) == (64, 64)
        x = torch.stack([model.preprocess(im, grid_hw=grid) for im in images])
        assert x.shape == (2, 3, 64, 64)
        batch = model.grid_attention(images, grid, 2)  # an int: the last 2 blocks, for both
        assert batch.shape == (2, 16, 16) and batch.dtype == torch.float32
        assert torch.allclose(batch, model.attention(x.to(model.device), [-2, -1]), atol=1e-6)
        assert torch.allclose(batch, model.attention(x.to(model.device), 2), atol=1e-6)
