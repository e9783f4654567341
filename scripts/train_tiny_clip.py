#!/usr/bin/env python
"""Train the tiny CLIP of the proving ground on the synthetic world (`ssr data synth`).

    python scripts/train_tiny_clip.py --out examples/models --steps 3000     # ~1 h on 2 CPU cores

The architecture is an open_clip model config (``examples/models/ssr-tiny-clip.json``): a
4-block, width-128 ViT image tower with patch 16 and QuickGELU, and a 3-block, width-64 text
tower with the real 49,408-token BPE vocabulary. It learns from image-caption pairs only (no
masks): the symmetric CLIP contrastive loss between the image embedding and its caption
("a photo of a boat and a star on water."), plus two losses between the image embedding and
the vocabulary's prompts ("a photo of a boat.", ..., and the background words): a
multi-label sigmoid loss, and for each class in the image a softmax cross-entropy against
the absent classes (without it the class prompts collapsed onto one "object" direction and
the CAMs of different classes in one image were identical).
``--pairs N`` adds the tiny DINO's correspondence loss (``scripts/train_tiny_dino.py``) on the
average attention of every image block; it is off by default, because in a trial it made the
attention local but the CAMs lost their localisation.
The image embedding is the one the CAMs use: the mean of the patch tokens after ``ln_post``
and ``proj`` (CLIP-ES), with the positional embedding interpolated to each batch's grid.

Scenes are rendered on the fly from world seed ``--world-seed`` (1000; the demo, tests and
benchmarks use other seeds, so they are held out), at sizes 128-224 in steps of 16. The loss
curve is printed every ``--log-every`` steps and CAM seeds mIoU on a small held-out set every
``--eval-every`` steps. The result is saved in OpenAI's state-dict layout (fp16 weights,
``input_resolution``/``context_length``/``vocab_size`` entries), so ``--clip-weights`` loads it
through the real loading path. It is a test world for the pipeline, not a substitute for
OpenAI's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssr_cli.data.synth import BACKGROUNDS, CLASSES, TEMPLATES, render_scene  # noqa: E402
from ssr_cli.models.vit_blocks import block_forward  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from train_tiny_dino import correspondence_loss, shifted_pair  # noqa: E402

CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 160, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
ARCH = "ssr-tiny-clip"
SIDES = (128, 144, 160, 176, 192, 208)
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
PAIR_MEAN = MEAN.view(3).numpy() * 255
PAIR_STD = STD.view(3).numpy() * 255


class Batches(torch.utils.data.IterableDataset):
    """Endless batches of rendered scenes; batch b is a pure function of (world seed, b).

    Each batch also holds ``pairs`` shifted crop pairs (128 px, the second moved by a multiple
    of 16 pixels) of other scenes of the world, for the correspondence loss."""

    def __init__(self, world_seed: int, batch_size: int, start: int, pairs: int = 0) -> None:
        self.world_seed, self.batch_size, self.start, self.pairs = world_seed, batch_size, start, pairs

    def __iter__(self):
        b = self.start
        while True:
            rng = np.random.default_rng([self.world_seed, 7, b])
            shape = (int(rng.choice(SIDES)), int(rng.choice(SIDES)))
            images, captions, targets = [], [], []
            for i in range(self.batch_size):
                scene = render_scene(self.world_seed, b * self.batch_size + i, shape=shape)
                images.append(scene.image)
                captions.append(scene.caption)
                target = np.zeros(len(CLASSES) + len(BACKGROUNDS), np.float32)
                for name in scene.classes:
                    target[CLASSES.index(name)] = 1
                target[len(CLASSES) + BACKGROUNDS.index(scene.background)] = 1
                targets.append(target)
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
            shift = (0, 0)
            while shift == (0, 0):
                shift = (16 * int(rng.integers(-3, 4)), 16 * int(rng.integers(-3, 4)))
            views: list[list[np.ndarray]] = [[], []]
            for i in range(self.pairs):
                index = 10_000_000 + b * self.pairs + i  # scenes no caption batch uses
                image = render_scene(self.world_seed, index, size_range=(176, 256)).image
                for v, crop in enumerate(shifted_pair(rng, image, shift, 128, PAIR_MEAN, PAIR_STD)):
                    views[v].append(crop)
            pair = [torch.from_numpy(np.stack(v)) for v in views] if self.pairs else []
            yield (x - MEAN) / STD, captions, torch.from_numpy(np.stack(targets)), pair, torch.tensor(shift)
            b += 1


def encode_image(model, x: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens after ln_post and proj, positional embedding interpolated."""
    visual = model.visual
    x = visual.transformer(embed_tokens(model, x))
    x = visual.ln_post(x)
    return x[:, 1:].mean(1) @ visual.proj


def blocks_qk(model, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image-tower block: (q times the attention scale, k) [N, heads, 1+h*w, head_dim]
    (the attention SGC's CLIP affinity averages: every block of this 4-block tower)."""
    h = embed_tokens(model, x)
    out = []
    for block in model.visual.transformer.resblocks:
        attn = block.attn
        n, length, width = h.shape
        head_dim = width // attn.num_heads
        qkv = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias)
        q, k, _ = qkv.view(n, length, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out.append((q * head_dim**-0.5, k))
        h, _ = block_forward(block, h)
    return out


def embed_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> the tokens entering the first block, positional embedding interpolated."""
    visual = model.visual
    x = visual.conv1(x)
    n, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g0 = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(g0, g0, width).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)[0]
    pos = torch.cat([pos[:1], grid.permute(1, 2, 0).reshape(gh * gw, width)], 0)
    cls = visual.class_embedding.view(1, 1, width).expand(n, -1, -1)
    return visual.ln_pre(torch.cat([cls, x], 1) + pos)


def class_softmax_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """For each present class c of an image: cross-entropy of c against the absent classes
    (the image's other present classes left out), so that class prompts must separate."""
    n, k = logits.shape
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    # [n, k (target), k]: the logits row for target c, other present classes masked
    rows = logits[:, None, :].expand(n, k, k)
    others = (present[:, None, :] > 0) & ~eye[None]
    rows = rows.masked_fill(others, float("-inf"))
    per = F.cross_entropy(
        rows.reshape(n * k, k), torch.arange(k, device=logits.device).repeat(n), reduction="none"
    )
    weight = present.reshape(-1)
    return (per * weight).sum() / weight.sum().clamp(min=1)


def prompts() -> list[str]:
    return [t.format(w) for w in (*CLASSES, *BACKGROUNDS) for t in TEMPLATES]


def build(seed: int):
    import open_clip

    folder = Path(__file__).resolve().parent / ".tmp-arch"
    folder.mkdir(exist_ok=True)
    (folder / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    shutil.rmtree(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    return model, open_clip.get_tokenizer(ARCH)


def save_openai(model, path: Path) -> None:
    """OpenAI's state-dict layout: fp16 weights (norms fp32) plus the three int entries."""
    import copy

    from open_clip.model import convert_weights_to_lp

    twin = copy.deepcopy(model).cpu()
    del twin.context_length, twin.vocab_size
    convert_weights_to_lp(twin, dtype=torch.float16)
    state = twin.state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"].half()  # fp16 in OpenAI's files
    state["input_resolution"] = torch.tensor(CONFIG["vision_cfg"]["image_size"])
    state["context_length"] = torch.tensor(CONFIG["text_cfg"]["context_length"])
    state["vocab_size"] = torch.tensor(CONFIG["text_cfg"]["vocab_size"])
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def evaluate_cams(out: Path, images: int, threads: int) -> float:
    """Seeds mIoU (best background rule) of the saved model on a held-out synthetic set."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "seeds"
        ssr = [sys.executable, "-m", "ssr_cli", "--quiet"]
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        subprocess.run(
            [
                *ssr,
                "data",
                "synth",
                "--out",
                str(data),
                "--images",
                str(images),
                "--seed",
                "7",
                "--val-fraction",
                "0",
            ],
            check=True,
            env=env,
            cwd=REPO,
        )
        subprocess.run(
            [
                *ssr,
                "make-seeds",
                "--data",
                str(data),
                "--split",
                "train",
                "--out",
                str(runs),
                "--clip-arch",
                str(out / f"{ARCH}.json"),
                "--clip-weights",
                str(out / "tiny_clip.pt"),
                "--no-save-attn",
            ],
            check=True,
            env=env,
            cwd=REPO,
        )
        result = subprocess.run(
            [*ssr, "eval", str(runs), "--data", str(data), "--split", "train", "--search-bg", "--json"],
            check=True,
            env=env,
            cwd=REPO,
            capture_output=True,
        )
        return float(json.loads(result.stdout)["summary"]["miou"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "models")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=1000)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the multi-label prompt loss")
    parser.add_argument("--corr-weight", type=float, default=1.0, help="weight of the correspondence loss")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="shifted crop pairs per step for the correspondence loss on every block's attention "
        "(0, the default: none; in a trial it made the attention local but took GradCAM's localisation)",
    )
    parser.add_argument("--max-logit-scale", type=float, default=30.0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = build(args.seed)
    model.to(device).train()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{ARCH}.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    bias = torch.nn.Parameter(torch.tensor(-5.0, device=device))
    optim.add_param_group({"params": [bias], "weight_decay": 0.0})
    prompt_tokens = tokenizer(prompts()).to(device)
    loader = torch.utils.data.DataLoader(
        Batches(args.world_seed, args.batch_size, 0, args.pairs),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
        persistent_workers=True,
    )
    start = time.perf_counter()
    running: list[float] = []
    for step, (x, captions, targets, pair, shift) in enumerate(loader):
        if step >= args.steps:
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        x, targets = x.to(device), targets.to(device)
        image = F.normalize(encode_image(model, x), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(captions).to(device)), dim=-1)
        words = F.normalize(model.encode_text(prompt_tokens), dim=-1)
        scale = model.logit_scale.exp().clamp(max=args.max_logit_scale)
        logits = scale * image @ text.T
        labels = torch.arange(len(captions), device=device)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        multilabel = F.binary_cross_entropy_with_logits(scale * image @ words.T + bias, targets)
        classes = class_softmax_loss(scale * image @ words[: len(CLASSES)].T, targets[:, : len(CLASSES)])
        loss = contrastive + args.aux_weight * (multilabel + classes)
        corr = torch.zeros((), device=device)
        if pair:
            corr = correspondence_loss(
                blocks_qk(model, pair[0].to(device)), blocks_qk(model, pair[1].to(device)), shift
            )
            loss = loss + args.corr_weight * corr
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        running.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - start
            terms = {
                "contrastive": contrastive,
                "classes": classes,
                "multilabel": multilabel,
                "correspondence": corr,
            }
            parts = "  ".join(f"{k} {float(v.detach()):.3f}" for k, v in terms.items())
            print(
                f"step {step + 1:5d}  loss {np.mean(running):.4f}  {parts}  "
                f"scale {float(scale.detach()):.1f}  lr {lr_at(step):.2e}  {elapsed / (step + 1):.2f} s/step",
                flush=True,
            )
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            save_openai(model, args.out / "tiny_clip.pt")
            miou = evaluate_cams(args.out, args.eval_images, args.threads)
            print(f"step {step + 1:5d}  held-out seeds mIoU {100 * miou:.1f}%", flush=True)
    size = (args.out / "tiny_clip.pt").stat().st_size
    print(
        f"saved {args.out / 'tiny_clip.pt'} ({size / 1e6:.1f} MB) after {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
