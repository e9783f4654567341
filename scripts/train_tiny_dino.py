#!/usr/bin/env python
"""Train the tiny DINO of the proving ground: self-distillation without labels on synthetic scenes.

    python scripts/train_tiny_dino.py --out examples/models --steps 1500   # ~40 min on 2 CPU cores

The model is timm's DINO ViT-S/16 architecture shrunk to width 128, 4 blocks, 4 heads
(``examples/models/ssr-tiny-dino.json`` is the ``--dino-model`` file: ``{"model":
"dino_vits16", "overrides": {...}}``). The objective is DINO's (Caron et al. 2021): a student
and an EMA teacher, each a ViT plus a projection head (MLP 3 layers, bottleneck 64,
weight-normalised output layer of ``--out-dim`` prototypes); the student matches the
centred, sharpened teacher distribution of two global crops (128 px) from all crops (two
global, ``--local-crops`` local ones of 64 px); teacher temperature 0.04 (warm-up from 0.04),
student 0.1, centre momentum 0.9, teacher momentum 0.996 -> 1 (cosine), AdamW with weight
decay 0.04 -> 0.4. Plus iBOT's masked-image objective (Zhou et al. 2022): half of the
student's global crops have 10-50% of their patches replaced by a mask token (random
blocks), and the student predicts the teacher's (centred, sharpened, temperature 0.05)
distribution of each masked patch; to fill a masked patch the student must look at the
patches that belong with it. Plus a correspondence loss on exactly what SGC reads, the last
block's head-averaged patch-to-patch attention: two crops of one scene at native scale,
shifted by a multiple of 16 pixels and colour-jittered independently; each patch of one
crop must attend (softmax over the other crop's patches) to the patch that shows the same
scene point in the other (in the spirit of contrastive random walks, Jabri et al. 2020).
Without it, DINO + iBOT left this tiny model's attention uniform after 400 steps (entropy
within 1% of uniform; the locality measure below stayed at chance). No labels or masks are
used for training.

Every ``--eval-every`` steps it prints how spatially meaningful the last block's attention
is on held-out scenes (their masks are used only for this measurement): the share of an
object patch's attention that stays on its own object, against the share that a
uniform attention would give (the object's area share). The weights are saved in the
layout of DINO's original ``.pth`` files (the backbone state dict, timm/DINO key names), so
``--dino-weights`` loads them through the real loading path. A test world for the pipeline,
not a substitute for DINO's weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssr_cli.data.synth import render_scene  # noqa: E402
from ssr_cli.models.dino import IMAGENET_MEAN, IMAGENET_STD, build_dino  # noqa: E402

SPEC = {"model": "dino_vits16", "overrides": {"embed_dim": 128, "depth": 4, "num_heads": 4}}
MEAN = np.array(IMAGENET_MEAN, np.float32) * 255
STD = np.array(IMAGENET_STD, np.float32) * 255


def photometric(
    rng: np.random.Generator, crop: np.ndarray, mean: np.ndarray = MEAN, std: np.ndarray = STD
) -> np.ndarray:
    """Colour jitter + grayscale + blur, then normalisation (ImageNet's) -> CHW float32."""
    import cv2

    crop = crop.astype(np.float32)
    if rng.random() < 0.8:
        crop = crop * rng.uniform(0.6, 1.4)
        mean = crop.mean()
        crop = (crop - mean) * rng.uniform(0.6, 1.4) + mean
        gray = crop.mean(axis=2, keepdims=True)
        crop = gray + (crop - gray) * rng.uniform(0.8, 1.2)
        crop = crop + rng.uniform(-12, 12, size=3)  # a small hue/tint shift
    if rng.random() < 0.2:
        crop = np.repeat(crop.mean(axis=2, keepdims=True), 3, axis=2)
    if rng.random() < 0.3:
        crop = cv2.GaussianBlur(crop, (0, 0), rng.uniform(0.1, 1.5))
    crop = (np.clip(crop, 0, 255) - mean) / std
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)


def random_crop(
    rng: np.random.Generator, image: np.ndarray, scale: tuple[float, float], size: int
) -> np.ndarray:
    """RandomResizedCrop + flip + :func:`photometric`, as DINO augments (numpy/OpenCV)."""
    import cv2

    h, w = image.shape[:2]
    area = h * w * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = int(min(h, max(8, round(math.sqrt(area / ratio)))))
    cw = int(min(w, max(8, round(math.sqrt(area * ratio)))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = cv2.resize(image[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return photometric(rng, crop)


def shifted_pair(
    rng: np.random.Generator,
    image: np.ndarray,
    shift: tuple[int, int],
    size: int = 128,
    mean: np.ndarray = MEAN,
    std: np.ndarray = STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of ``image`` at native scale, the second moved by ``shift`` pixels (multiples
    of 16, so patch (i, j) of the first is patch (i - dy/16, j - dx/16) of the second)."""
    dy, dx = shift
    h, w = image.shape[:2]
    y = int(rng.integers(max(0, -dy), h - size - max(0, dy) + 1))
    x = int(rng.integers(max(0, -dx), w - size - max(0, dx) + 1))
    first = image[y : y + size, x : x + size]
    second = image[y + dy : y + dy + size, x + dx : x + dx + size]
    return photometric(rng, first, mean, std), photometric(rng, second, mean, std)


class Crops(torch.utils.data.IterableDataset):
    def __init__(self, world_seed: int, batch_size: int, local_crops: int) -> None:
        self.world_seed, self.batch_size, self.local_crops = world_seed, batch_size, local_crops

    def __iter__(self):
        b = 0
        while True:
            rng = np.random.default_rng([self.world_seed, 11, b])
            views: list[list[np.ndarray]] = [[] for _ in range(2 + self.local_crops)]
            pairs: list[list[np.ndarray]] = [[], []]
            shift = (0, 0)
            while shift == (0, 0):
                shift = (16 * int(rng.integers(-3, 4)), 16 * int(rng.integers(-3, 4)))
            for i in range(self.batch_size):
                image = render_scene(self.world_seed, b * self.batch_size + i, size_range=(176, 256)).image
                for v in range(2):
                    views[v].append(random_crop(rng, image, (0.35, 1.0), 128))
                for v in range(self.local_crops):
                    views[2 + v].append(random_crop(rng, image, (0.08, 0.35), 64))
                for v, crop in enumerate(shifted_pair(rng, image, shift)):
                    pairs[v].append(crop)
            crops = [torch.from_numpy(np.stack(v)) for v in views]
            yield crops, [torch.from_numpy(np.stack(v)) for v in pairs], torch.tensor(shift)
            b += 1


def last_block_qk(backbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (times the attention scale), k of the last block's attention, [N, heads, 1+h*w,
    head_dim] (what SGC reads)."""
    t = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))
    for block in backbone.blocks[:-1]:
        t = block(t)
    attn = backbone.blocks[-1].attn
    t = backbone.blocks[-1].norm1(t)
    n, length, _ = t.shape
    qkv = attn.qkv(t).reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]) * attn.scale, attn.k_norm(qkv[1])


def correspondence_loss(
    first: list[tuple[torch.Tensor, torch.Tensor]],
    second: list[tuple[torch.Tensor, torch.Tensor]],
    shift: torch.Tensor,
) -> torch.Tensor:
    """Each patch of one view must attend to the patch showing the same scene point in the
    other view. ``first``/``second``: per attention block, (q times the scale, k) of each view,
    [N, heads, 1+g*g, head_dim] (CLS first); the attention is the softmax over the other
    view's patches, averaged over heads and blocks."""
    grid = math.isqrt(first[0][0].shape[2] - 1)
    sy, sx = int(shift[0]) // 16, int(shift[1]) // 16
    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    total = torch.zeros((), device=first[0][0].device)
    for queries, keys, (dy, dx) in ((first, second, (sy, sx)), (second, first, (-sy, -sx))):
        ti, tj = ii - dy, jj - dx  # a patch (i, j) of the query view in the key view
        src = ((ti >= 0) & (ti < grid) & (tj >= 0) & (tj < grid)).reshape(-1)
        dst = (ti * grid + tj).reshape(-1)
        probs = torch.stack(
            [
                torch.softmax(q[:, :, 1:] @ k[:, :, 1:].transpose(-2, -1), dim=-1).mean(1)
                for (q, _), (_, k) in zip(queries, keys, strict=True)
            ]
        ).mean(0)
        picked = probs[:, src][:, torch.arange(int(src.sum())), dst[src]]
        total = total - torch.log(picked + 1e-8).mean()
    return total / 2


class Head(torch.nn.Module):
    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 64) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, bottleneck),
        )
        self.last = torch.nn.utils.parametrizations.weight_norm(
            torch.nn.Linear(bottleneck, out_dim, bias=False)
        )
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Net(torch.nn.Module):
    """Backbone + head; ``forward`` returns the head's CLS outputs of every crop and, for the
    global crops, the head's outputs of every patch token (iBOT's masked-patch targets)."""

    def __init__(self, backbone, head: Head) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = torch.nn.Parameter(torch.zeros(backbone.embed_dim))

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1+h*w, D]; ``mask`` [N, h, w] replaces those patch embeddings."""
        b = self.backbone
        x = b.patch_embed(x)  # NHWC with dynamic_img_size
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        return b.norm(b.blocks(b.norm_pre(b._pos_embed(x))))

    def forward(self, crops: list[torch.Tensor], masks: torch.Tensor | None = None):
        glob = self.tokens(torch.cat(crops[:2]), masks)
        cls = [glob[:, 0]]
        if len(crops) > 2:
            cls.append(self.tokens(torch.cat(crops[2:]))[:, 0])
        return self.head(torch.cat(cls)), self.head(glob[:, 1:])


def random_masks(rng: np.random.Generator, n: int, grid: tuple[int, int]) -> torch.Tensor:
    """iBOT-style: half of the images get 10-50% of their patches masked (random blocks)."""
    masks = np.zeros((n, *grid), bool)
    for i in range(n):
        if rng.random() < 0.5:
            continue
        target = rng.uniform(0.1, 0.5) * grid[0] * grid[1]
        while masks[i].sum() < target:
            bh, bw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            y, x = int(rng.integers(0, grid[0] - bh + 1)), int(rng.integers(0, grid[1] - bw + 1))
            masks[i, y : y + bh, x : x + bw] = True
    return torch.from_numpy(masks)


def cosine(base: float, final: float, step: int, total: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / max(1, total)))


def attention_locality(backbone, scenes: list) -> tuple[float, float]:
    """(mean share of an object patch's affinity on its own object, the uniform share).

    The affinity is the one SGC uses: the last block's head-averaged patch attention,
    normalised, symmetrised and squared (``ssr_cli.refine.affinity.fuse_affinity``).
    """
    import cv2

    from ssr_cli.models.dino import timm_block_attention
    from ssr_cli.refine.affinity import fuse_affinity

    own, chance = [], []
    for scene in scenes:
        image = scene.image[: scene.image.shape[0] // 16 * 16, : scene.image.shape[1] // 16 * 16]
        grid = (image.shape[0] // 16, image.shape[1] // 16)
        x = torch.from_numpy((image.astype(np.float32) - MEAN) / STD).permute(2, 0, 1)[None]
        captured: dict[str, torch.Tensor] = {}

        def keep_input(module, args, output, captured=captured) -> None:  # noqa: ANN001
            captured["x"] = args[0]

        handle = backbone.blocks[-1].attn.register_forward_hook(keep_input)
        with torch.no_grad():
            backbone(x)
            attn = timm_block_attention(backbone.blocks[-1].attn, captured["x"])[0, 1:, 1:]
        handle.remove()
        affinity = fuse_affinity({"dino": attn.float()}, {"dino": 1.0})
        mask = scene.mask[: image.shape[0], : image.shape[1]]
        label = cv2.resize(mask, (grid[1], grid[0]), interpolation=cv2.INTER_NEAREST).reshape(-1)
        for value in np.unique(label):
            if value in (0, 255):
                continue
            inside = torch.from_numpy(label == value)
            rows = affinity[inside] / affinity[inside].sum(1, keepdim=True)
            own.append(float(rows[:, inside].sum(1).mean()))
            chance.append(float(inside.float().mean()))
    return float(np.mean(own)), float(np.mean(chance))


def save_original_layout(backbone, path: Path) -> None:
    """The backbone state dict with DINO's key names (timm's are the same), fp32."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "models")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--out-dim", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--corr-weight", type=float, default=1.0, help="weight of the correspondence loss")
    parser.add_argument("--patch-weight", type=float, default=1.0, help="weight of iBOT's masked-patch loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    backbone = build_dino(SPEC["model"], seed=args.seed, arch_overrides=SPEC["overrides"])
    student = Net(backbone, Head(backbone.embed_dim, args.out_dim)).to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ssr-tiny-dino.json").write_text(json.dumps(SPEC, indent=2) + "\n")
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    center = torch.zeros(1, args.out_dim, device=device)
    center_patch = torch.zeros(1, args.out_dim, device=device)
    mask_rng = np.random.default_rng([args.seed, 5])
    warmup = min(100, args.steps // 10)
    held_out = [render_scene(3, i) for i in range(24)]
    base, chance = attention_locality(backbone, held_out)
    print(f"step     0  attention on own object {100 * base:.1f}% (uniform {100 * chance:.1f}%)", flush=True)
    loader = torch.utils.data.DataLoader(
        Crops(args.world_seed, args.batch_size, args.local_crops),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
    )
    start, running = time.perf_counter(), []
    for step, batch in enumerate(loader):
        if step >= args.steps:
            break
        lr = (
            args.lr * (step + 1) / warmup
            if step < warmup
            else cosine(args.lr, 1e-6, step - warmup, args.steps - warmup)
        )
        optim.param_groups[0]["lr"] = optim.param_groups[1]["lr"] = lr
        optim.param_groups[0]["weight_decay"] = cosine(0.04, 0.4, step, args.steps)
        crops, pair, shift = batch
        crops = [c.to(device) for c in crops]
        n = crops[0].shape[0]
        grid = (crops[0].shape[-2] // 16, crops[0].shape[-1] // 16)
        masks = random_masks(mask_rng, 2 * n, grid).to(device)
        with torch.no_grad():
            t_cls, t_patch = teacher(crops[:2])
            t_prob = F.softmax((t_cls - center) / 0.04, dim=-1).chunk(2)
            t_patch_prob = F.softmax((t_patch - center_patch) / 0.05, dim=-1)
        s_cls, s_patch = student(crops, masks)
        s_out = (s_cls / 0.1).chunk(len(crops))
        loss, terms = torch.zeros((), device=device), 0
        for ti, tp in enumerate(t_prob):
            for si, so in enumerate(s_out):
                if si == ti:
                    continue
                loss = loss + torch.sum(-tp * F.log_softmax(so, dim=-1), dim=-1).mean()
                terms += 1
        loss = loss / terms
        flat = masks.flatten(1)
        patch_ce = torch.sum(-t_patch_prob * F.log_softmax(s_patch / 0.1, dim=-1), dim=-1)
        patch_loss = (patch_ce * flat).sum() / flat.sum().clamp(min=1)
        loss = loss + args.patch_weight * patch_loss
        corr = correspondence_loss(
            [last_block_qk(student.backbone, pair[0].to(device))],
            [last_block_qk(student.backbone, pair[1].to(device))],
            shift,
        )
        loss = loss + args.corr_weight * corr
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        if step < 50:  # DINO freezes the last layer in the first epoch
            student.head.last.parametrizations.weight.original1.grad = None
        optim.step()
        with torch.no_grad():
            m = cosine(0.996, 1.0, step, args.steps)
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            center.mul_(0.9).add_(t_cls.mean(0, keepdim=True), alpha=0.1)
            center_patch.mul_(0.9).add_(t_patch.mean((0, 1)).unsqueeze(0), alpha=0.1)
        running.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0:
            print(
                f"step {step + 1:5d}  loss {np.mean(running):.4f}  "
                f"correspondence {float(corr.detach()):.3f}  lr {lr:.2e}  "
                f"{(time.perf_counter() - start) / (step + 1):.2f} s/step  ({n} images)",
                flush=True,
            )
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            save_original_layout(teacher.backbone, args.out / "tiny_dino.pth")
            own, chance = attention_locality(teacher.backbone, held_out)
            print(
                f"step {step + 1:5d}  attention on own object {100 * own:.1f}% (uniform {100 * chance:.1f}%, "
                f"untrained {100 * base:.1f}%)",
                flush=True,
            )
    size = (args.out / "tiny_dino.pth").stat().st_size
    print(
        f"saved {args.out / 'tiny_dino.pth'} ({size / 1e6:.1f} MB) after {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
