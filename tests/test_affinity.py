"""Affinity normalisation, fusion, box masks and CAM refinement (CLIP-ES CAA, SSR SGC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssr_cli.errors import ConfigError
from ssr_cli.refine.affinity import (
    box_mask,
    box_masks,
    fuse_affinity,
    normalise_attention,
    refine_cams,
    resample_attention,
)

pytestmark = pytest.mark.timeout(60)


def random_attention(n: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, n, generator=g, dtype=torch.float64), dim=1)


def test_normalise_rows_exact_columns_close_and_symmetrised_is_symmetric():
    # Observed max |column sum - 1| after 3 passes on 42x42 softmax(s * N(0, 1)) logits:
    # s=1: 1.8e-4, s=2: 3.2e-2, s=3: 1.7e-1 (at 768x768: 4e-8, 3.4e-3, 1.5e-1). Peaky
    # attention converges slowly; CLIP-ES stops at 3 passes all the same.
    attn = random_attention(42, seed=0, sharpness=1.0)
    t = normalise_attention(attn, iters=3)
    rows, cols = t.sum(dim=1), t.sum(dim=0)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-12)
    col_err = (cols - 1).abs().max().item()
    assert 1e-6 < col_err < 1e-3
    peaky = (normalise_attention(random_attention(42, seed=0, sharpness=2.0)).sum(dim=0) - 1).abs().max()
    assert 1e-3 < peaky.item() < 5e-2
    # more passes converge (Sinkhorn): the column error shrinks
    assert (normalise_attention(attn, iters=10).sum(dim=0) - 1).abs().max().item() < col_err / 100
    # one pass starts with columns: after it the rows are exact, the columns are not
    one = normalise_attention(attn, iters=1)
    assert torch.allclose(one.sum(dim=1), torch.ones(42, dtype=one.dtype), atol=1e-12)
    sym = fuse_affinity({"clip": attn}, power=1)
    assert torch.equal(sym, sym.T)
    assert (sym.sum(dim=0) - 1).abs().max().item() < 1e-3  # still close to doubly stochastic
    squared = fuse_affinity({"clip": attn})
    assert torch.allclose(squared, sym @ sym, atol=1e-12)


def test_normalise_order_is_columns_then_rows():
    attn = random_attention(6, seed=1)
    cols_first = attn / attn.sum(0, keepdim=True)
    cols_first = cols_first / cols_first.sum(1, keepdim=True)
    rows_first = attn / attn.sum(1, keepdim=True)
    rows_first = rows_first / rows_first.sum(0, keepdim=True)
    got = normalise_attention(attn, iters=1)
    assert torch.allclose(got, cols_first, atol=1e-12)
    assert not torch.allclose(got, rows_first, atol=1e-6)


# ----------------------------------------------------------------------------- reference CAA


def reference_box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Boxes of the 8-connected components of CLIP-ES's quantised threshold map, by hand."""
    h, w = cam.shape
    on = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            on[i, j] = int(cam[i, j] / cam.max() * 255) > int(threshold * 255)
    comp, n = ndimage.label(on, structure=np.ones((3, 3)))
    mask = np.zeros((h, w))
    for k in range(1, n + 1):
        ys, xs = np.nonzero(comp == k)
        for i in range(ys.min(), ys.max() + 1):
            for j in range(xs.min(), xs.max() + 1):
                mask[i, j] = 1
    return mask


def reference_caa(attn: np.ndarray, cams: np.ndarray, threshold: float) -> np.ndarray:
    n = attn.shape[0]
    t = attn.copy()
    for _ in range(3):
        for j in range(n):
            t[:, j] = t[:, j] / sum(t[i, j] for i in range(n))
        for i in range(n):
            t[i, :] = t[i, :] / sum(t[i, j] for j in range(n))
    s = np.zeros_like(t)
    for i in range(n):
        for j in range(n):
            s[i, j] = (t[i, j] + t[j, i]) / 2
    sq = np.zeros_like(s)
    for i in range(n):
        for j in range(n):
            sq[i, j] = sum(s[i, k] * s[k, j] for k in range(n))
    out = []
    for cam in cams:
        mask = reference_box_mask(cam, threshold).reshape(-1)
        vec = cam.reshape(-1)
        refined = np.array([sum(sq[i, j] * mask[j] * vec[j] for j in range(n)) for i in range(n)])
        refined = refined - refined.min()
        refined = refined / (refined.max() + 1e-7)
        out.append(refined.reshape(cam.shape))
    return np.stack(out)


def test_caa_matches_a_direct_reference():
    h, w = 6, 7
    attn = random_attention(h * w, seed=2)
    yy, xx = np.mgrid[0:h, 0:w]
    cam_a = np.exp(-((yy - 1.0) ** 2 + (xx - 1.5) ** 2) / 2.0) + 0.8 * np.exp(
        -((yy - 4.5) ** 2 + (xx - 5.5) ** 2)
    )
    cam_b = np.exp(-((yy - 3.0) ** 2 + (xx - 3.0) ** 2) / 4.0)
    cams = np.stack([cam_a, cam_b])
    cams = (cams - cams.min(axis=(1, 2), keepdims=True)) / np.ptp(cams, axis=(1, 2), keepdims=True)
    cams_t = torch.from_numpy(cams)
    masks = box_masks(cams_t, 0.4)
    assert masks.shape == (2, h, w) and set(masks.unique().tolist()) <= {0.0, 1.0}
    # class a has two separate blobs: two boxes, some patches between them stay outside
    assert 0 < masks[0].sum() < h * w
    got = refine_cams(fuse_affinity({"clip": attn.float()}), cams_t.float(), masks)
    want = reference_caa(attn.numpy(), cams, 0.4)
    assert got.shape == (2, h, w)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)
    # the mask matters: without it the result differs
    unmasked = refine_cams(fuse_affinity({"clip": attn.float()}), cams_t.float(), None)
    assert (unmasked - got).abs().max() > 1e-2


def test_box_mask_edges_empty_and_types():
    cam = np.zeros((5, 8), np.float32)
    cam[1:3, 5:8] = 1.0  # touches the right edge
    whole = box_mask(cam)
    assert isinstance(whole, np.ndarray)
    assert whole[1:3, 5:8].all() and whole.sum() == 6
    quirk = box_mask(cam, clip_es_edges=True)  # CLIP-ES clips the end to width - 1
    assert quirk[1:3, 5:7].all() and quirk[:, 7].sum() == 0 and quirk.sum() == 4
    assert box_mask(np.zeros((4, 4), np.float32)).sum() == 0
    t = box_mask(torch.from_numpy(cam))
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(whole))


def test_box_mask_threshold_is_relative_to_the_max():
    cam = np.array([[0.0, 0.2, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    # 0.2 / 0.5 = 0.4 is not strictly above the threshold; only the peak survives
    assert box_mask(cam, 0.4).sum() == 1
    assert box_mask(cam, 0.3).sum() == 2


def test_refine_cams_masks_and_errors():
    h, w = 4, 5
    aff = fuse_affinity({"clip": random_attention(h * w, seed=3).float()})
    cams = torch.rand(2, h, w, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2, h, w)
    assert torch.allclose(refine_cams(aff, cams, None), refine_cams(aff, cams, ones))
    empty = torch.stack([torch.zeros(h, w), torch.ones(h, w)])
    out = refine_cams(aff, cams, empty)
    assert out[0].abs().max() == 0 and out[1].max() > 0.99 and out[1].min() == 0
    with pytest.raises(ValueError):
        refine_cams(aff, cams[:, :3], None)


def test_fuse_affinity_weights_and_errors():
    a, b = random_attention(12, seed=4).float(), random_attention(12, seed=5).float()
    alone = fuse_affinity({"clip": a})
    assert torch.allclose(alone, fuse_affinity({"clip": a}, {"clip": 1.0}))
    fused = fuse_affinity({"clip": a, "dino": b})
    mix = 0.4 * normalise_attention(a) + 0.6 * normalise_attention(b)
    mix = (mix + mix.T) / 2
    assert torch.allclose(fused, mix @ mix, atol=1e-6)
    assert not torch.allclose(fused, fuse_affinity({"clip": a, "dino": b}, {"clip": 0.6, "dino": 0.4}))
    with pytest.raises(ConfigError, match="no fusion weight"):
        fuse_affinity({"clip": a, "other": b})
    with pytest.raises(ConfigError, match="different shapes"):
        fuse_affinity({"clip": a, "dino": random_attention(9, seed=6).float()})
    with pytest.raises(ConfigError):
        fuse_affinity({})


def test_resample_attention_keeps_rows_stochastic_and_structure():
    src, dst = (9, 12), (8, 10)
    n = src[0] * src[1]
    side = torch.tensor([0 if j < src[1] // 2 else 1 for i in range(src[0]) for j in range(src[1])])
    attn = (side[:, None] == side[None, :]).float()  # each half attends to itself only
    attn = attn / attn.sum(dim=1, keepdim=True)
    out = resample_attention(attn, src, dst)
    assert out.shape == (dst[0] * dst[1],) * 2
    assert torch.allclose(out.sum(dim=1), torch.ones(dst[0] * dst[1]), atol=1e-5) and out.min() >= 0
    grid = out.reshape(dst[0], dst[1], dst[0], dst[1])
    left_query_mass_left = grid[:, 0, :, : dst[1] // 2].sum(dim=(-1, -2))
    right_query_mass_right = grid[:, -1, :, dst[1] // 2 :].sum(dim=(-1, -2))
    assert left_query_mass_left.min() > 0.95 and right_query_mass_right.min() > 0.95
    # an identity (every patch attends to itself) stays local: each row peaks at its own place
    local = resample_attention(torch.eye(n), src, dst)
    peak = local.argmax(dim=1)
    rows, cols = peak // dst[1], peak % dst[1]
    want_r = torch.arange(dst[0] * dst[1]) // dst[1]
    want_c = torch.arange(dst[0] * dst[1]) % dst[1]
    assert (rows - want_r).abs().max() <= 1 and (cols - want_c).abs().max() <= 1
    same = resample_attention(attn * 3, src, src)
    assert torch.allclose(same, attn, atol=1e-6)
    with pytest.raises(ValueError):
        resample_attention(attn, (8, 12), dst)
