"""GradCAM of CLIP on the last block's ``ln_1`` output, as CLIP-ES computes it.

CLIP-ES (``generate_cams_voc12.py`` with its vendored ``pytorch_grad_cam``), checked
point by point:

- logits = ``logit_scale.exp()`` (100 for OpenAI's weights) * cos(image, text),
  over the image's present foreground classes and all background classes;
  softmax; the target of class c is its softmax probability;
- image embedding = mean of the patch tokens after ``ln_post``, then ``proj``;
- the target layer is ``resblocks[-1].ln_1``; its CLS token is dropped
  (``reshape_transform``) for both the activation and the gradient;
- weight = spatial mean of the gradient per channel; CAM = ReLU(sum over
  channels of weight * activation) (the ReLU comes after the sum);
- normalisation ``scale_cam_image``: cam - min, divided by (max + 1e-7).

``gradcam`` does all (image, class) pairs of a batch with ONE forward of the last
block per image and one backward per (image, class) pair: the images with the same
number of classes C run the last block together, then C backward passes (their first
classes, then their second, ...); images do not interact, so the gradient of the sum of
their j-th classes' targets is, image by image, that class's own gradient. Nothing
else needs a graph: the trunk runs without one, no parameter requires grad, and only
the input gradient of the last block is computed.
``gradcam_loop`` is the reference (one image and one backward per class, like CLIP-ES).

Imports torch: import lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ssr_cli.models.clip import ClipModel, ImageTokens, TrunkTokens

Head = Callable[[torch.Tensor], torch.Tensor]
EPS = 1e-7  # pytorch_grad_cam's scale_cam_image


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of [..., h, w] to [0, 1]: (x - min) / (max(x - min) + 1e-7)."""
    flat = cams.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (flat.max(dim=-1, keepdim=True).values + EPS)
    return flat.view_as(cams)


def _texts(fg: torch.Tensor, bg: torch.Tensor, text_head: Head | None) -> torch.Tensor:
    texts = torch.cat([fg, bg], dim=0)
    if text_head is not None:
        texts = text_head(texts)
    return F.normalize(texts.float(), dim=-1)


def _cam_from(activation: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[P, 1+hw, D] activation and gradient -> [P, h, w] normalised CAMs (CLS dropped)."""
    act, g = activation[:, 1:].float(), grad[:, 1:].float()
    weights = g.mean(dim=1, keepdim=True)
    cam = (act * weights).sum(dim=-1).clamp_min(0)
    return normalize_cams(cam.view(-1, *grid))


#: GradCAM targets: ``prob`` = the softmax probability of the class (CLIP-ES); ``logodds`` =
#: log(p / (1 - p)) = logit_c - logsumexp(other logits). Their gradients differ only by the
#: positive factor p (1 - p), so after the per-map min-max they give the same CAM, except
#: where p rounds to exactly 1.0 in float32 and the probability's gradient is 0 (a class
#: that wins by a cosine gap of about 0.2 at a logit scale of 100): log-odds never saturate.
CAM_TARGETS = ("prob", "logodds")


def resolve_target(target: str | None, image_head: object | None) -> str:
    """``target``, or its default: ``prob`` for plain CLIP, ``logodds`` in a projected space."""
    if target is None or target == "auto":
        return "prob" if image_head is None else "logodds"
    if target not in CAM_TARGETS:
        from ssr_cli.errors import ConfigError

        raise ConfigError(f"unknown CAM target {target!r}", hint="use --cam-target auto, prob or logodds")
    return target


def cam_target(logits: torch.Tensor, cls_idx: torch.Tensor, target: str) -> torch.Tensor:
    """[P]: the differentiated score of each pair's class from masked logits [P, T] (-inf = left out)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if target == "prob":
        return logits.softmax(dim=-1)[rows, cls_idx]
    own = logits[rows, cls_idx]
    others = logits.clone()
    others[rows, cls_idx] = float("-inf")
    rest = torch.logsumexp(others, dim=-1)
    return own - torch.where(torch.isfinite(rest), rest, torch.zeros_like(rest))


def _check(present: Sequence[Sequence[int]], n: int, k: int) -> None:
    if len(present) != n:
        raise ValueError(f"present lists {len(present)} images but the batch holds {n}")
    for classes in present:
        if any(not 0 <= c < k for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(f"present classes {list(classes)} must be distinct indices in 0..{k - 1}")


def gradcam(
    model: ClipModel,
    x: torch.Tensor | ImageTokens | TrunkTokens,
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    image_head: Head | None = None,
    text_head: Head | None = None,
    precision: str = "fp32",
    logit_scale: float | None = None,
    target: str | None = None,
) -> list[torch.Tensor]:
    """CAMs of every present class of every image: one forward, one backward per class slot.

    - ``x``: [N, 3, H, W] CLIP-normalised images of one size (H, W multiples of the
      patch size), or the ``TrunkTokens`` (or ``ImageTokens``) of such a batch (to share
      one forward with the attention of ``model.trunk_tokens(..., attn_blocks=...)``).
    - ``present``: per image, 0-based indices into ``fg`` of its classes.
    - ``fg`` [K, E], ``bg`` [B, E]: text embeddings (``text_embeddings``).
    - ``image_head`` / ``text_head``: applied to the image embeddings [N, E] (row by row) and
      to the text embeddings [K+B, E] before L2 normalisation (None = identity).
    - ``logit_scale``: None = the model's (``exp`` of the learned scale).
    - ``target``: what is differentiated (see :data:`CAM_TARGETS`); None = ``"prob"``
      for plain CLIP (CLIP-ES) and ``"logodds"`` with an ``image_head`` (CMPA's space).

    Returns, per image, a float32 CPU tensor [C_i, h, w] (h = H/p, w = W/p), each
    map min-max normalised; C_i = len(present[i]) in that order.

    Cost: the first L-1 blocks run once per image without a graph; the last block runs
    once per image with a graph from its ``ln_1`` output, and backward once per
    (image, class) pair, in one call per class slot of each group of images with the
    same number of classes.
    """
    if isinstance(x, (ImageTokens, TrunkTokens)):
        pre, ln1, grid = x.pre, x.ln1.detach(), x.grid
    else:
        pre, ln1, _ = model.trunk(x, precision=precision)
        grid = (x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size)
    n, k = pre.shape[0], fg.shape[0]
    _check(present, n, k)
    pairs = [(i, c) for i, classes in enumerate(present) for c in classes]
    if not pairs:
        return [torch.zeros(0, *grid) for _ in range(n)]
    device = pre.device
    scale = model.logit_scale if logit_scale is None else float(logit_scale)
    kind = resolve_target(target, image_head)
    with torch.no_grad(), model.autocast(precision):  # no gradient reaches the texts
        texts = _texts(fg.to(device), bg.to(device), text_head)
    by_count: dict[int, list[int]] = {}  # images with the same number of classes share backward passes
    for i, classes in enumerate(present):
        if classes:
            by_count.setdefault(len(classes), []).append(i)
    maps: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for count, images in by_count.items():
        rows = torch.tensor(images, device=device)
        allowed = torch.zeros(len(images), k + bg.shape[0], dtype=torch.bool, device=device)
        allowed[:, k:] = True
        for row, i in enumerate(images):
            allowed[row, list(present[i])] = True
        leaf = ln1[rows].requires_grad_(True)  # [n_g, 1+hw, D]: the only input the backward reaches
        with torch.enable_grad():
            with model.autocast(precision):
                _, emb = model.pool(model.last_block(pre[rows], leaf))
                if image_head is not None:
                    emb = image_head(emb)
            logits = scale * F.normalize(emb.float(), dim=-1) @ texts.t()
            logits = logits.masked_fill(~allowed, float("-inf"))
            for j in range(count):  # the j-th class of every image of the group
                cls_idx = torch.tensor([present[i][j] for i in images], device=device)
                chosen = cam_target(logits, cls_idx, kind)
                (grad,) = torch.autograd.grad(chosen.sum(), leaf, retain_graph=j < count - 1)
                for row, cam in enumerate(_cam_from(leaf.detach(), grad, grid)):
                    maps[images[row]].append(cam)
    return [torch.stack(m).cpu() if m else torch.zeros(0, *grid) for m in maps]


def gradcam_loop(
    model: ClipModel,
    x: torch.Tensor,
    present: Sequence[Sequence[int]],
    fg: torch.Tensor,
    bg: torch.Tensor,
    image_head: Head | None = None,
    text_head: Head | None = None,
    precision: str = "fp32",
    logit_scale: float | None = None,
    target: str | None = None,
) -> list[torch.Tensor]:
    """Reference for ``gradcam``: one image and one backward per class, CLIP-ES's order of texts
    ([present fg..., bg...]). Same arguments and result (``x`` must be a tensor)."""
    _check(present, x.shape[0], fg.shape[0])
    scale = model.logit_scale if logit_scale is None else float(logit_scale)
    results = []
    for i, classes in enumerate(present):
        tokens = model.image_tokens(x[i : i + 1], grad_last_block=True, precision=precision)
        if not classes:
            results.append(torch.zeros(0, *tokens.grid))
            continue
        with torch.enable_grad():
            emb = tokens.embedding
            with model.autocast(precision):
                if image_head is not None:
                    emb = image_head(emb)
                texts = _texts(fg[list(classes)].to(emb.device), bg.to(emb.device), text_head)
            logits = scale * F.normalize(emb.float(), dim=-1) @ texts.t()
            kind = resolve_target(target, image_head)
            maps = []
            for j in range(len(classes)):
                score = cam_target(logits, torch.tensor([j], device=logits.device), kind)[0]
                (grad,) = torch.autograd.grad(score, tokens.ln1, retain_graph=True)
                maps.append(_cam_from(tokens.ln1.detach(), grad, tokens.grid))
        results.append(torch.cat(maps, dim=0).cpu())
    return results


def merge_scales(
    cams_per_scale: Sequence[torch.Tensor],
    out_hw: tuple[int, int],
    flipped: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Merge CAMs [C, h_s, w_s] of several scales/flips into [C, h, w] = ``out_hw``.

    Each is un-flipped (horizontally) when ``flipped[i]``, resized bilinearly
    (half-pixel centres) to ``out_hw``, then they are summed and each map is
    min-max normalised. CLIP-ES itself uses scale 1.0 without flip (it builds the
    flipped and multi-scale inputs but keeps only the first); this merge is our
    choice, following the usual multi-scale CAM practice (sum, then normalise).
    """
    if not cams_per_scale:
        raise ValueError("merge_scales needs at least one CAM stack")
    flips = list(flipped) if flipped is not None else [False] * len(cams_per_scale)
    if len(flips) != len(cams_per_scale):
        raise ValueError("flipped must have one entry per CAM stack")
    total = None
    for cams, flip in zip(cams_per_scale, flips, strict=True):
        cams = cams.float()
        if flip:
            cams = cams.flip(-1)
        if tuple(cams.shape[-2:]) != tuple(out_hw):
            cams = F.interpolate(cams[None], size=tuple(out_hw), mode="bilinear", align_corners=False)[0]
        total = cams if total is None else total + cams
    assert total is not None
    return normalize_cams(total)
