"""CLIP layer: weight resolution and formats, CLIP-ES preprocessing, tokens, attention, prompts."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from tinymodels import CLIP_FORMATS, TINY_CLIP, make_tiny_clip, register_tiny_clip, tiny_clip_files

from ssr_cli.errors import ConfigError, WeightsError
from ssr_cli.models.weights import resolve_weights, weights_cache_dir

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return tiny_clip_files(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def clip(files):
    from ssr_cli.models.clip import load_clip

    return load_clip(TINY_CLIP, str(files["safetensors"]))


# ----------------------------------------------------------------------------- weights


def test_every_format_loads_the_same_weights(files) -> None:
    from ssr_cli.models.clip import load_clip
    from ssr_cli.models.weights import read_state_dict

    reference = make_tiny_clip().state_dict()
    assert read_state_dict(files["openai-torchscript"])[1] == "torchscript"
    assert read_state_dict(files["safetensors"])[1] == "safetensors"
    assert read_state_dict(files["openclip-pt"])[1] == "torch"
    x = torch.randn(1, 3, 224, 240, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for fmt in CLIP_FORMATS:
        model = load_clip(TINY_CLIP, str(files[fmt]))
        state = model.model.state_dict()
        assert set(state) == set(reference), fmt
        assert all(torch.equal(state[k], reference[k]) for k in reference), fmt
        assert all(v.dtype == torch.float32 for v in state.values()), fmt
        assert model.quick_gelu and not model.is_random
        assert not any(p.requires_grad for p in model.model.parameters())
        outputs[fmt] = (model.image_tokens(x, grad_last_block=False).embedding, model.encode_text(["a cat"]))
    first = outputs[CLIP_FORMATS[0]]
    for fmt in CLIP_FORMATS[1:]:
        assert torch.equal(outputs[fmt][0], first[0]) and torch.equal(outputs[fmt][1], first[1]), fmt


def test_provenance_records_origin_path_and_sha256(files) -> None:
    from ssr_cli.models.clip import load_clip

    path = files["openclip-bin"]
    model = load_clip(TINY_CLIP, str(path))
    info = model.describe()["weights"]
    assert info["origin"] == "flag" and info["path"] == str(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_weights_are_marked_and_seeded() -> None:
    from ssr_cli.models.clip import load_clip

    register_tiny_clip()
    a, b, c = (load_clip(TINY_CLIP, "random", seed=s) for s in (3, 3, 4))
    assert a.is_random and a.weights_source.origin == "random" and a.weights_source.path is None
    assert a.describe()["seed"] == 3
    pa, pb, pc = (m.model.visual.proj for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_openai_architectures_get_quick_gelu() -> None:
    from open_clip.transformer import QuickGELU

    from ssr_cli.models.clip import default_quick_gelu, load_clip

    assert default_quick_gelu("ViT-B-16") and default_quick_gelu("ViT-L-14")  # OpenAI weights need it
    assert default_quick_gelu("ViT-B-16-quickgelu")
    assert not default_quick_gelu("ViT-B-16-plus-240")  # no OpenAI weights: the config's GELU
    register_tiny_clip()
    gelu = load_clip(TINY_CLIP, "random").model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(gelu, QuickGELU)
    plain = load_clip(TINY_CLIP, "random", quick_gelu=False).model.visual.transformer.resblocks[0].mlp.gelu
    assert not isinstance(plain, QuickGELU)


@pytest.mark.parametrize("fmt", ["openai-torchscript", "openclip-pt", "safetensors"])
def test_truncated_file_is_a_weights_error_naming_it(files, tmp_path, fmt) -> None:
    from ssr_cli.models.clip import load_clip

    broken = tmp_path / files[fmt].name
    content = files[fmt].read_bytes()
    broken.write_bytes(content[: len(content) // 2])
    with pytest.raises(WeightsError) as err:
        load_clip(TINY_CLIP, str(broken))
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_state_dict_of_another_architecture_is_refused(files, tmp_path) -> None:
    from ssr_cli.models.clip import load_clip

    state = make_tiny_clip().state_dict()
    state["visual.proj"] = torch.zeros(64, 16)
    del state["visual.ln_post.bias"]
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="do not fit CLIP architecture") as err:
        load_clip(TINY_CLIP, str(path))
    assert str(path) in str(err.value) and "visual.ln_post.bias" in str(err.value)


def test_missing_explicit_file_and_unknown_arch(tmp_path) -> None:
    from ssr_cli.models.clip import load_clip

    register_tiny_clip()
    with pytest.raises(WeightsError, match="not found") as err:
        load_clip(TINY_CLIP, str(tmp_path / "nope.pt"))
    assert str(tmp_path / "nope.pt") in str(err.value)
    with pytest.raises(ConfigError, match="unknown CLIP architecture"):
        load_clip("ViT-X-99", "random")


def test_resolution_order_flag_env_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "cache"))
    cached = weights_cache_dir("clip") / "M.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    flag_file, env_file = tmp_path / "flag.pt", tmp_path / "env.pt"
    flag_file.write_bytes(b"f")
    env_file.write_bytes(b"e")
    calls = []
    kw = dict(env_var="SSR_T_WEIGHTS", cache_candidates=[cached], download=lambda: calls.append(1))
    monkeypatch.setenv("SSR_T_WEIGHTS", str(env_file))
    assert resolve_weights("clip", "M", str(flag_file), **kw).origin == "flag"
    assert resolve_weights("clip", "M", None, **kw).path == env_file
    monkeypatch.setenv("SSR_T_WEIGHTS", "random")
    assert resolve_weights("clip", "M", None, **kw).is_random
    monkeypatch.delenv("SSR_T_WEIGHTS")
    source = resolve_weights("clip", "M", None, **kw)
    assert source.origin == "cache" and source.path == cached
    assert resolve_weights("clip", "M", str(cached.parent), **kw).path == cached  # a folder holding M.pt
    assert not calls


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable host"])
def test_offline_failure_is_fast_and_says_what_to_do(tmp_path, monkeypatch, how) -> None:
    from ssr_cli.models.clip import clip_weights_source

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SSR_CACHE", str(tmp_path / "ssr"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("SSR_CLIP_WEIGHTS", raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # the probe itself must give up: a non-routable address never answers
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "https://10.255.255.1")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        clip_weights_source("ViT-B-16", None)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert elapsed < 10, elapsed
    assert "\n" not in message and "offline" in message
    assert "ViT-B-16.pt" in message and "--clip-weights PATH" in message
    assert str(tmp_path / "ssr" / "weights" / "clip") in message and "--clip-weights random" in message


# ----------------------------------------------------------------------------- image tower


def test_preprocess_is_clip_es_resize_and_normalise(clip) -> None:
    from PIL import Image
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD

    image = skdata.coffee()[:375, :500]  # VOC-like 500x375
    out = clip.preprocess(image)
    assert out.shape == (3, 384, 512)  # CLIP-ES rounds each side UP to a multiple of 16
    assert clip.resized_size(375, 500, 0.5) == (192, 256) and clip.resized_size(224, 224) == (224, 224)
    # CLIP-ES's own pipeline (generate_cams_voc12.py: _transform_resize)
    reference = Compose(
        [
            Resize((384, 512), interpolation=InterpolationMode.BICUBIC),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(Image.fromarray(image))
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)


def test_tokens_at_224_match_open_clip(clip) -> None:
    x = clip.preprocess(skdata.astronaut())[None]  # 512x512
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    tokens = clip.image_tokens(x, grad_last_block=True)
    visual = clip.model.visual
    assert torch.equal(clip.pos_embedding(14, 14), visual.positional_embedding)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, patches = visual(x)  # open_clip's own path: ln_post'd patch tokens
    finally:
        visual.output_tokens = False
    assert torch.allclose(tokens.post[:, 1:], patches, atol=1e-5)
    assert torch.allclose(tokens.embedding, patches.mean(1) @ visual.proj, atol=1e-5)
    assert torch.allclose(clip.patch_embeddings(tokens), patches @ visual.proj, atol=1e-5)
    # only the last block is in the graph: ln1 is a leaf, the trunk has no graph
    assert tokens.ln1.requires_grad and tokens.ln1.grad_fn is None
    assert not tokens.pre.requires_grad and tokens.embedding.grad_fn is not None


@pytest.mark.parametrize("size", [(224, 352), (176, 208), (208, 176)])
def test_pos_embedding_interpolates_to_any_grid(clip, size) -> None:
    from ssr_cli.cam.labels import upsample_cams

    gh, gw = size[0] // 16, size[1] // 16
    pos = clip.pos_embedding(gh, gw)
    native = clip.model.visual.positional_embedding.detach()
    assert pos.shape == (1 + gh * gw, native.shape[1])
    assert torch.equal(pos[0], native[0])  # CLS position kept
    grid = native[1:].reshape(14, 14, -1).permute(2, 0, 1).numpy()
    expected = upsample_cams(grid, (gh, gw)).reshape(grid.shape[0], -1).T  # independent bilinear
    assert np.allclose(pos[1:].numpy(), expected, atol=1e-5)
    assert clip.pos_embedding(gh, gw) is pos  # cached per grid
    tokens = clip.image_tokens(torch.randn(1, 3, *size), grad_last_block=False)
    assert tokens.grid == (gh, gw) and tokens.ln1.shape == (1, 1 + gh * gw, clip.width)


def test_recomputed_attention_reproduces_the_block(clip) -> None:
    from ssr_cli.models.clip import block_attention

    x = clip.preprocess(skdata.chelsea())[None]  # 300x451 -> 304x464
    pre, ln1, attn = clip.trunk(x, attn_blocks=[-2, -1])
    block = clip.blocks[-1]
    probs = block_attention(block, ln1, average_heads=False)  # [1, H, L, L]
    heads, width = block.attn.num_heads, ln1.shape[-1]
    v = torch.nn.functional.linear(
        ln1, block.attn.in_proj_weight[2 * width :], block.attn.in_proj_bias[2 * width :]
    )
    v = v.view(1, -1, heads, width // heads).transpose(1, 2)
    mixed = (probs @ v).transpose(1, 2).reshape(1, -1, width)
    recomputed = block.attn.out_proj(mixed)
    with torch.no_grad():
        real, torch_weights = block.attn(ln1, ln1, ln1, need_weights=True)
    assert torch.allclose(recomputed, real, atol=1e-5)
    assert torch.allclose(probs.mean(1), torch_weights, atol=1e-6)
    # block-averaged patch attention of the last two blocks, CLS row and column dropped
    ln1_prev = clip.blocks[-2].ln_1(clip.run_block(0, clip.embed(x)))
    expected = (block_attention(clip.blocks[-2], ln1_prev) + probs.mean(1)) / 2
    assert attn is not None and attn.shape == (1, 19 * 29, 19 * 29)
    assert torch.allclose(attn, expected[:, 1:, 1:], atol=1e-6)
    assert torch.allclose(clip.attention(x, blocks=[-2, -1]), attn, atol=1e-6)
    assert torch.allclose(clip.attention(x, blocks=2), attn, atol=1e-6)  # an int: the last n blocks
    assert torch.allclose(clip.attention(x), clip.attention(x, blocks=[0, 1, 2]))  # last 8 of 3 = all
    with pytest.raises(ConfigError):
        clip.attention(x, blocks=[3])


def test_trunk_takes_the_attention_from_its_own_forward(clip, monkeypatch) -> None:
    from ssr_cli.models import clip as clip_module

    x = clip.preprocess(skdata.chelsea())[None]
    h = clip.embed(x)
    with torch.no_grad():
        ours, probs = clip_module.block_forward(clip.blocks[0], h, need_probs=True)
        assert torch.allclose(ours, clip.run_block(0, h), atol=1e-5)  # open_clip's own block
        assert probs is not None
        assert torch.allclose(
            probs, clip_module.block_attention(clip.blocks[0], clip.blocks[0].ln_1(h)), atol=1e-6
        )
    recomputed = []
    real = clip_module.block_attention
    monkeypatch.setattr(clip_module, "block_attention", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    plain = clip.trunk(x)
    pre, ln1, attn = clip.trunk(x, attn_blocks=3)
    assert len(recomputed) == 1  # only the last block's (its forward is GradCAM's), not blocks 0 and 1
    assert torch.equal(pre, plain[0]) and torch.equal(ln1, plain[1])  # the tokens do not depend on it
    tokens = clip.trunk_tokens(x, attn_blocks=3)
    assert tokens.grid == (19, 29) and tokens.attn is not None and torch.equal(tokens.attn, attn)


# ----------------------------------------------------------------------------- text


def test_text_embeddings_follow_clip_es(clip) -> None:
    from ssr_cli.cam.prompts import text_embeddings
    from ssr_cli.data.vocab import Vocabulary

    vocab = Vocabulary(
        name="t",
        classes=("cat", "dog"),
        prompts=("cat", "dog puppy"),
        templates=("a clean origami {}.", "a photo of a {}."),
        background=("sky", "grass", "wall"),
    )
    fg, bg = text_embeddings(clip, vocab)
    assert fg.shape == (2, clip.embed_dim) and bg.shape == (3, clip.embed_dim)
    for word, row in [
        ("dog puppy", fg[1]),
        ("wall", bg[2]),
    ]:  # CLIP-ES's zeroshot_classifier, one word at a time
        with torch.no_grad():
            e = clip.model.encode_text(clip.tokenizer([t.format(word) for t in vocab.templates]))
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        assert torch.allclose(row, e / e.norm(), atol=1e-6)


def test_text_cache_round_trip_and_key(clip, tmp_path) -> None:
    from ssr_cli.cam.prompts import cached_text_embeddings, load_text_cache, text_cache_key
    from ssr_cli.data.vocab import load_vocabulary

    voc = load_vocabulary("voc")
    path = tmp_path / "text.safetensors"
    fg, bg = cached_text_embeddings(clip, voc, path)
    assert fg.shape == (20, clip.embed_dim) and bg.shape == (25, clip.embed_dim)
    key = text_cache_key(clip, voc)
    assert clip.weights_source.sha256 is not None
    loaded = load_text_cache(path, key)
    assert loaded is not None and torch.equal(loaded[0], fg) and torch.equal(loaded[1], bg)
    assert load_text_cache(path, key + "x") is None
    assert text_cache_key(clip, load_vocabulary("coco")) != key
    mtime = path.stat().st_mtime_ns
    again = cached_text_embeddings(clip, voc, path)
    assert path.stat().st_mtime_ns == mtime and torch.equal(again[0], fg)
    path.write_bytes(b"garbage")
    assert load_text_cache(path, key) is None


def test_patch_embeddings_of_a_bf16_pass_are_float32(clip) -> None:
    """train-cmpa's and train's feature pass projects the patch tokens outside autocast: the bf16
    tokens of a bf16 pass must meet the fp32 ``proj`` (this mix failed on the first GPU run)."""
    x = torch.randn(2, 3, 64, 48)
    full = clip.patch_embeddings(clip.image_tokens(x, grad_last_block=False))
    tokens = clip.image_tokens(x, grad_last_block=False, precision="bf16")
    assert tokens.post.dtype == torch.bfloat16
    half = clip.patch_embeddings(tokens)
    assert half.dtype == torch.float32 and half.shape == full.shape == (2, 12, clip.embed_dim)
    assert torch.nn.functional.cosine_similarity(half, full, dim=-1).min() > 0.99
