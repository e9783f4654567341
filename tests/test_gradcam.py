"""GradCAM (batched == per-class loop == CLIP-ES's hook recipe), scale merging, CAM -> labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from tinymodels import TINY_CLIP, tiny_clip_files

from ssr_cli.cam.labels import background_score, cams_to_labels, upsample_cams

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from ssr_cli.models.clip import load_clip

    files = tiny_clip_files(tmp_path_factory.mktemp("tiny-clip"))
    return load_clip(TINY_CLIP, str(files["openai-torchscript"]))


@pytest.fixture(scope="module")
def texts(clip):
    from ssr_cli.cam.prompts import text_embeddings
    from ssr_cli.data.vocab import load_vocabulary

    return text_embeddings(clip, load_vocabulary("voc"))


@pytest.fixture(scope="module")
def photos(clip) -> torch.Tensor:
    """Two real photos at their original size 300x451 -> [2, 3, 304, 464] (grid 19x29)."""
    cat = skdata.chelsea()
    coffee = skdata.coffee()[50:350, 100:551]
    return torch.stack([clip.preprocess(cat), clip.preprocess(coffee)])


def _hook_reference(clip, x, classes, fg, bg):
    """CLIP-ES's way: a forward hook on resblocks[-1].ln_1 inside open_clip's own full forward,
    one backward of the softmax probability per class, texts ordered [present fg, bg]."""
    visual = clip.model.visual
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["act"] = output

    gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
    native = visual.positional_embedding
    handle = clip.blocks[-1].ln_1.register_forward_hook(keep)
    visual.positional_embedding = torch.nn.Parameter(clip.pos_embedding(gh, gw).clone(), requires_grad=False)
    visual.output_tokens = True
    cams = []
    try:
        texts = torch.cat([fg[classes], bg])
        texts = texts / texts.norm(dim=-1, keepdim=True)
        for j in range(len(classes)):
            with torch.enable_grad():
                _, patches = visual(x.clone().requires_grad_(True))
                emb = patches.mean(1) @ visual.proj
                emb = emb / emb.norm(dim=-1, keepdim=True)
                probs = (clip.logit_scale * emb @ texts.t()).softmax(dim=-1)
                probs[0, j].backward()
            act = captured["act"][:, 1:].detach()
            grad = captured["act"].grad[:, 1:]
            cam = (act * grad.mean(dim=1, keepdim=True)).sum(-1).clamp_min(0).view(gh, gw)
            cam = cam - cam.min()
            cams.append(cam / (cam.max() + 1e-7))
    finally:
        handle.remove()
        visual.positional_embedding = native
        visual.output_tokens = False
    return torch.stack(cams)


def test_batched_equals_per_class_loop_on_real_photos(clip, texts, photos) -> None:
    from ssr_cli.cam.gradcam import gradcam, gradcam_loop

    fg, bg = texts
    present = [[7, 14, 0], [10]]  # cat, person, aeroplane | diningtable
    batched = gradcam(clip, photos, present, fg, bg)
    loop = gradcam_loop(clip, photos, present, fg, bg)
    assert [c.shape for c in batched] == [(3, 19, 29), (1, 19, 29)]
    for a, b in zip(batched, loop, strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert float(a.min()) == 0.0 and float(a.max()) <= 1.0
    # the maps differ between classes (each replica only fed its own target)
    assert (batched[0][0] - batched[0][1]).abs().max() > 1e-3


def test_gradcam_matches_clip_es_hook_recipe(clip, texts, photos) -> None:
    from ssr_cli.cam.gradcam import gradcam

    fg, bg = texts
    ours = gradcam(clip, photos[:1], [[7, 14]], fg, bg)[0]
    reference = _hook_reference(clip, photos[:1], [7, 14], fg, bg)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_heads_shared_tokens_and_one_last_block_forward_per_image(clip, texts, photos, monkeypatch) -> None:
    from ssr_cli.cam.gradcam import gradcam, gradcam_loop

    fg, bg = texts
    gen = torch.Generator().manual_seed(0)
    w_img, w_txt = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    heads = dict(image_head=lambda e: e @ w_img, text_head=lambda t: t @ w_txt)
    present = [[2, 5], [5]]
    loop = gradcam_loop(clip, photos, present, fg, bg, **heads)
    plain = gradcam(clip, photos, present, fg, bg)
    assert not torch.allclose(loop[0], plain[0], atol=1e-3)  # the heads change the CAMs
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    real_last_block = clip.last_block
    forwards = []

    def counting_last_block(pre, ln1):
        forwards.append(ln1.shape[0])
        return real_last_block(pre, ln1)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(clip, "last_block", counting_last_block)
    for tokens in (
        clip.trunk_tokens(photos, attn_blocks=range(-2, 0)),  # one trunk forward shared with the attention
        clip.image_tokens(photos, grad_last_block=False, attn_blocks=range(-2, 0)),
    ):
        calls.clear()
        forwards.clear()
        batched = gradcam(clip, tokens, present, fg, bg, **heads)
        # the last block once per image (not per class), one backward per (image, class) pair:
        # image 0 (2 classes) and image 1 (1 class) are in different groups
        assert sorted(forwards) == [1, 1] and len(calls) == 3
        for a, b in zip(batched, loop, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    calls.clear()
    forwards.clear()
    same = [[2, 5], [7, 5]]  # as many classes each: one forward of both, one backward per class slot
    batched = gradcam(clip, photos, same, fg, bg, **heads)
    assert forwards == [2] and len(calls) == 2
    for a, b in zip(batched, gradcam_loop(clip, photos, same, fg, bg, **heads), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    empty = gradcam(clip, photos, [[], []], fg, bg)
    assert [c.shape for c in empty] == [(0, 19, 29), (0, 19, 29)]
    with pytest.raises(ValueError):
        gradcam(clip, photos, [[20], []], fg, bg)


def test_bf16_autocast_stays_close_to_fp32(clip, texts, photos) -> None:
    from ssr_cli.cam.gradcam import gradcam

    fg, bg = texts
    present = [[7, 14], [10]]
    full = torch.cat(gradcam(clip, photos, present, fg, bg, precision="fp32"))
    half = torch.cat(gradcam(clip, photos, present, fg, bg, precision="bf16"))
    assert half.dtype == torch.float32 and half.shape == full.shape
    for a, b in zip(full, half, strict=True):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert r > 0.98, r


def test_merge_scales_unflips_resizes_and_normalises() -> None:
    from ssr_cli.cam.gradcam import merge_scales, normalize_cams

    gen = torch.Generator().manual_seed(0)
    cam = torch.rand(2, 6, 8, generator=gen)
    assert torch.allclose(merge_scales([cam], (6, 8)), normalize_cams(cam))
    assert torch.allclose(
        merge_scales([cam, cam.flip(-1)], (6, 8), [False, True]), normalize_cams(cam), atol=1e-6
    )
    small = F.interpolate(cam[None], size=(3, 4), mode="bilinear", align_corners=False)[0]
    merged = merge_scales([cam, small], (6, 8))
    expected = normalize_cams(
        cam + F.interpolate(small[None], size=(6, 8), mode="bilinear", align_corners=False)[0]
    )
    assert merged.shape == (2, 6, 8) and torch.allclose(merged, expected, atol=1e-6)
    flat = normalize_cams(torch.zeros(1, 3, 3))
    assert torch.equal(flat, torch.zeros(1, 3, 3))  # zero range: no NaN


# ----------------------------------------------------------------------------- labels


def test_upsample_cams_matches_cv2_and_torch() -> None:
    import cv2

    cams = np.random.default_rng(0).random((3, 19, 29)).astype(np.float32)
    up = upsample_cams(cams, (300, 451))
    assert up.shape == (3, 300, 451) and up.dtype == np.float32
    for c in range(3):
        assert np.allclose(up[c], cv2.resize(cams[c], (451, 300), interpolation=cv2.INTER_LINEAR), atol=1e-5)
    torch_up = F.interpolate(
        torch.from_numpy(cams)[None], size=(300, 451), mode="bilinear", align_corners=False
    )
    assert np.allclose(up, torch_up[0].numpy(), atol=1e-5)


def test_cams_to_labels_alpha_and_threshold() -> None:
    cams = np.zeros((2, 2, 3), dtype=np.float32)
    cams[0] = [[0.9, 0.2, 0.0], [0.6, 0.45, 0.0]]
    cams[1] = [[0.1, 0.7, 0.0], [0.5, 0.5, 0.3]]
    # alpha 1: bg = 1 - max -> [[.1 .3 1], [.4 .5 .7]]
    assert cams_to_labels(cams, [3, 15], alpha=1).tolist() == [[3, 15, 0], [3, 0, 0]]
    # alpha 2: bg = (1 - max)^2 -> [[.01 .09 1], [.16 .25 .49]]
    assert cams_to_labels(cams, [3, 15], alpha=2).tolist() == [[3, 15, 0], [3, 15, 0]]
    # constant threshold wins over alpha; ties go to background
    assert cams_to_labels(cams, [3, 15], alpha=2, bg_threshold=0.5).tolist() == [[3, 15, 0], [3, 0, 0]]
    assert np.allclose(background_score(cams, 2.0), (1 - cams.max(0)) ** 2)
    none = cams_to_labels(np.zeros((0, 2, 3), np.float32), [], alpha=1)
    assert none.dtype == np.uint8 and not none.any()
    with pytest.raises(ValueError):
        cams_to_labels(cams, [1], alpha=1)


def test_logodds_target_survives_saturation_where_prob_vanishes(clip, photos) -> None:
    """A class that wins by a wide cosine margin: its softmax probability is exactly 1.0 in
    float32 at logit scale 100, so the probability's gradient (and CAM) vanish; the
    log-odds target gives a non-zero CAM, and equals the probability's CAM at small margins."""
    from ssr_cli.cam.gradcam import gradcam

    x = photos[:1]
    with torch.no_grad():
        emb = F.normalize(clip.image_tokens(x, grad_last_block=False).embedding.float(), dim=-1)[0]
    g = torch.Generator().manual_seed(0)
    other = F.normalize(torch.randn(3, emb.shape[0], generator=g), dim=-1)
    other = F.normalize(other - (other @ emb)[:, None] * emb, dim=-1)  # cosine 0 with the image
    fg = torch.cat([emb[None], other[:1]])  # class 0 = the image itself: cosine gap 1.0
    bg = other[1:]
    prob = gradcam(clip, x, [[0]], fg, bg, logit_scale=100.0, target="prob")[0]
    logodds = gradcam(clip, x, [[0]], fg, bg, logit_scale=100.0, target="logodds")[0]
    assert float(prob.abs().max()) == 0.0  # saturated: p == 1.0 exactly, gradient 0
    assert float(logodds.max()) == pytest.approx(1.0, abs=1e-3)  # a real, normalised map
    # at a small scale nothing saturates: the gradients differ by the factor p (1 - p) only,
    # so the maps agree up to the 1e-7 in the min-max normalisation
    small_prob = gradcam(clip, x, [[0]], fg, bg, logit_scale=2.0, target="prob")[0]
    small_logodds = gradcam(clip, x, [[0]], fg, bg, logit_scale=2.0, target="logodds")[0]
    corr = np.corrcoef(small_prob.flatten().numpy(), small_logodds.flatten().numpy())[0, 1]
    assert corr > 0.9999, corr
    # plain CLIP keeps CLIP-ES's target; a projection head switches to log-odds
    from ssr_cli.cam.gradcam import resolve_target

    assert resolve_target(None, None) == "prob"
    assert resolve_target("auto", torch.nn.Identity()) == "logodds"
