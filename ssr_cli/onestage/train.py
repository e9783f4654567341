"""The single-stage SSR training loop (one process, or DistributedDataParallel under torchrun).

One step (the batch and its augmentation as ``train-cmpa``'s: ``cmpa.data``):

1. frozen CLIP forward of the augmented batch: the output tokens of the decoder's blocks, the
   attention of the last ``clip_blocks`` blocks, and GradCAM of every present class through
   the current CMPA heads (``cam.gradcam`` with ISA/TSA: the projected space);
2. online pseudo-masks from those CAMs (``pseudo.py``: CLIP + DINO affinity, SGC mask,
   background rule; no CRF), constants for the loss;
3. ``L = L_proto + gamma * L_seg``: the prototype contrastive loss of CMPA on the CAM-weighted
   features (``cmpa.loss``) and the balanced cross-entropy of the decoder's logits (upsampled
   to the pseudo-mask grid) against the pseudo-masks, 255 ignored (``seg.loss``);
4. AdamW: CMPA heads and temperature at ``lr`` (constant, as train-cmpa), the decoder at
   ``seg_lr`` with poly decay. Prototypes are refreshed over the whole split at iterations 0,
   ``proto_every``, ... (and moved by EMA with ``proto_ema`` > 0), as in train-cmpa.

Exact resume as train-cmpa and fit-seg: batches are pure functions of (seed, iteration, rank),
torch's RNG is re-seeded every step, and ``last.pt`` holds heads, decoder, optimizer,
scheduler, scaler, prototypes, RNG states, the best validation score and the log window.

Imports torch: import lazily.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssr_cli.cmpa.data import Loader, TrainItem
from ssr_cli.cmpa.prototypes import Prototypes
from ssr_cli.cmpa.train import load_or_init_heads
from ssr_cli.errors import DataError
from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD
from ssr_cli.models.cmpa import CmpaHeads
from ssr_cli.onestage.config import SsrConfig
from ssr_cli.onestage.decoder import (
    DecoderConfig,
    SegDecoder,
    SsrSegmenter,
    capture_blocks,
    layer_tokens,
    save_model_file,
)
from ssr_cli.onestage.parts import Joint, build_decoder, joint_optimizer, region_cache
from ssr_cli.onestage.pseudo import RegionCache, dino_grid_attention, pseudo_masks
from ssr_cli.seg.loss import segmentation_loss
from ssr_cli.train import distributed as D
from ssr_cli.train.log import peak_memory_mb
from ssr_cli.train.loop import open_run_files, sync_device, wrap_ddp
from ssr_cli.train.proto_loop import ProtoLoop, ProtoParts, add_finite, prompt_set
from ssr_cli.train.state import restore_training

STAGE = "train"  # (its step seeds)
PARTS = ("data", "clip", "pseudo", "forward", "update")
# log-window sums: loss, proto, n_proto, seg, n_seg, steps, foreground share of the pseudo-masks
WINDOW_SIZE = 7


@dataclass
class ClipPass:
    """A step's frozen CLIP pass: its ``tokens`` (with the last blocks' attention), the CAMs of
    the present classes (``cams``; ``flat`` [P, h*w]) for the (image, class) pairs ``img_idx``,
    ``cls_idx``; the patch embeddings ``patches`` and the decoder's input tokens ``feats_in``."""

    tokens: Any
    cams: list[torch.Tensor]
    flat: torch.Tensor
    img_idx: torch.Tensor
    cls_idx: torch.Tensor
    patches: torch.Tensor
    feats_in: list[torch.Tensor]


class SsrLoop(ProtoLoop):
    """``ssr train``'s steps: CLIP and GradCAM through the heads, online pseudo-masks, the prototype
    and segmentation losses; validation of the decoder; its checkpoints."""

    name = STAGE
    timed = PARTS
    timed_apart = ("protos", "val", "superpixels")
    window_size = WINDOW_SIZE

    def setup(
        self, dino: Any, decoder: SegDecoder, decoder_cfg: DecoderConfig, scheduler: Any, regions: Any
    ) -> None:
        """The parts of ``ssr train`` beyond the prototype loop's."""
        cfg, model = self.cfg, self.model
        self.dino, self.decoder, self.decoder_cfg, self.scheduler = dino, decoder, decoder_cfg, scheduler
        self.regions: RegionCache | None = regions
        self.sources = cfg.affinity.split("+") if cfg.affinity != "none" else []
        self.weights = dict(zip(("clip", "dino"), cfg.affinity_weights, strict=True))
        self.layers, self.last_block = decoder_cfg.layers, len(model.blocks) - 1
        self.segmenter = SsrSegmenter(model, decoder, self.precision)
        self.cam_target = None if cfg.cam_target == "auto" else cfg.cam_target

    def prefetch(self, ahead: int) -> None:
        if self.regions is not None:
            self.regions.submit(self.stream.indices(ahead, self.env.rank))

    def step(self, it: int) -> torch.Tensor:
        cfg, device = self.cfg, self.env.device
        self.begin_step(it)
        t0 = time.perf_counter()
        idx, _side, augs = self.batch_of(it)
        x = self.fetch(it)
        t1 = time.perf_counter()
        present = [list(self.items[i].classes) for i in idx]
        clip = self.clip_forward(x, present)
        sync_device(device)
        t2 = time.perf_counter()
        target, waited = self.pseudo_targets(x, clip, present, idx, [a.flip for a in augs])
        sync_device(device)
        t3 = time.perf_counter() - waited
        step = self.prototype_forward(
            clip.patches, clip.flat, clip.img_idx, clip.cls_idx, clip.feats_in, clip.tokens.grid
        )
        sync_device(device)
        t4 = time.perf_counter() - waited
        logits = F.interpolate(
            step.rest[0].float(), size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        l_seg = segmentation_loss(logits, target, cfg.seg_loss)
        touch = step.touch()
        loss = step.loss + cfg.gamma * l_seg + 0.0 * touch  # every parameter in the graph (DDP)
        self.update(loss)
        self.scheduler.step()
        self.ema(step, clip.cls_idx)
        self.count(loss, step.loss, l_seg, target)
        sync_device(device)
        t5 = time.perf_counter() - waited
        # forward: heads, decoder, prototype loss; update: segmentation loss, backward, step
        self.times.add_step((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))
        return loss.detach()

    def clip_forward(self, x: torch.Tensor, present: list[list[int]]) -> ClipPass:
        """Frozen CLIP on the batch: block tokens, attention, GradCAM through the current heads."""
        from ssr_cli.cam.gradcam import gradcam

        model, heads, precision, device = self.model, self.heads, self.precision, self.env.device
        with torch.no_grad():
            fg_cam, bg_cam = heads.project_text(self.prompts.fg), heads.project_text(self.prompts.bg)
        with capture_blocks(model, self.layers) as found_tokens:
            tokens = model.image_tokens(
                x,
                grad_last_block=False,
                precision=precision,
                attn_blocks=self.cfg.clip_blocks if "clip" in self.sources else None,
            )
        cams = gradcam(
            model,
            tokens,
            present,
            fg_cam,
            bg_cam,
            image_head=heads.project_image,
            precision=precision,
            target=self.cam_target,
        )
        with torch.no_grad():
            patches = model.patch_embeddings(tokens).detach()
        feats_in = layer_tokens(found_tokens, tokens.post, self.layers, self.last_block)
        pairs = [(i, c) for i, classes in enumerate(present) for c in classes]
        img_idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
        cls_idx = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
        flat = torch.cat([c.flatten(1) for c in cams], dim=0).to(device).float()
        return ClipPass(tokens, cams, flat, img_idx, cls_idx, patches, feats_in)

    def pseudo_targets(
        self, x: torch.Tensor, clip: ClipPass, present: list[list[int]], idx: list[int], flips: list[Any]
    ) -> tuple[torch.Tensor, float]:
        """(the step's online pseudo-masks, seconds spent waiting for superpixels: once per image,
        not step time)."""
        from ssr_cli.refine.affinity import fuse_affinity

        cfg, tokens = self.cfg, clip.tokens
        with torch.no_grad():
            attn: dict[str, torch.Tensor] = {}
            if "clip" in self.sources:
                assert tokens.attn is not None
                attn["clip"] = tokens.attn.float()
            if "dino" in self.sources:
                attn["dino"] = dino_grid_attention(self.dino, x, tokens.grid, cfg.dino_blocks, self.precision)
            affinity = fuse_affinity(attn, self.weights) if attn else None
            waited = time.perf_counter()
            maps = None if self.regions is None else [self.regions.get(i) for i in idx]
            waited = time.perf_counter() - waited
            self.times.pause(waited, "superpixels")
            target = pseudo_masks(clip.cams, present, affinity, maps, flips, cfg).to(self.env.device)
        return target, waited

    def count(
        self, loss: torch.Tensor, l_proto: torch.Tensor, l_seg: torch.Tensor, target: torch.Tensor
    ) -> None:
        """Add the step to the log window's sums."""
        window = self.window
        window[0] += loss.detach().double()
        for j, v in ((1, l_proto), (3, l_seg)):
            add_finite(window, j, v)
        window[5] += 1
        labelled = target != 255
        window[6] += float(((target > 0) & labelled).sum()) / max(int(labelled.sum()), 1)

    def log_window(self, done: int) -> None:
        w = self.reduced_window().tolist()
        busy = sum(self.times.window.values())
        speed = self.speed()
        record = {
            "type": "train",
            "iter": done,
            "loss": w[0] / max(w[5], 1),
            "loss_proto": w[1] / w[2] if w[2] else None,
            "loss_seg": w[3] / w[4] if w[4] else None,
            "pseudo_fg": w[6] / max(w[5], 1),
            "temperature": self.heads.temperature,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seg_lr": self.optimizer.param_groups[2]["lr"],
            "iters_per_s": round(speed, 4),
            "seconds_per_iter": round(1 / max(speed, 1e-9), 4),
            "pseudo_share": round(self.times.window["pseudo"] / busy, 4) if busy > 0 else None,
            **peak_memory_mb(self.env.device),
            **{f"time_{k}": round(v, 4) for k, v in self.times.window.items()},
        }
        self.report_window(done, record, f"loss {record['loss']:.4f}  {speed:.2f} it/s")

    def paused(self, seconds: float) -> None:
        self.times.pause(seconds, "val")  # validation and checkpoints are not step time

    def validate(self, done: int) -> None:
        from ssr_cli.seg.infer import validation_miou

        if self.bar is not None:
            self.bar.update(advance=0, status=f"validating {len(self.val_samples)} images")
        decoder_cfg = self.decoder_cfg
        result = validation_miou(
            self.segmenter,
            self.val_samples,
            decoder_cfg.num_classes,
            decoder_cfg.class_names,
            CLIP_MEAN,
            CLIP_STD,
            self.env,
            self.precision,
        )
        miou = result["miou"]

        def best_state() -> dict[str, Any]:
            return {
                "iteration": done,
                "decoder": self.decoder.state_dict(),
                "miou": miou,
                "decoder_config": decoder_cfg.to_dict(),
                "fingerprint": self.fingerprint,
            }

        self.validated(done, miou, best_state, bar_status=False)
        self.sync_module.train()

    def best_record(self) -> dict[str, Any]:
        return {"best": self.best}

    def state_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        decoder = {"decoder": self.decoder.state_dict(), "decoder_config": self.decoder_cfg.to_dict()}
        return decoder, {"scheduler": self.scheduler.state_dict()}

    def timing_summary(self, seconds: float) -> dict[str, Any]:
        steps = self.cfg.iters - self.start
        timing = self.times.total
        busy = sum(timing[key] for key in PARTS)
        return {
            "seconds_per_iter": round(busy / steps, 4) if steps else None,
            "time_share": self.times.shares(),
            "pseudo_share": round(timing["pseudo"] / busy, 4) if busy > 0 else None,
            "prototype_seconds": round(timing["protos"], 2),
            "superpixel_seconds": round(timing["superpixels"], 2),
        }


def train(
    out: Path,
    model: Any,
    dino: Any,
    items: list[TrainItem],
    val_samples: list[Any],
    vocab: Any,
    cfg: SsrConfig,
    decoder_cfg: DecoderConfig,
    env: D.DistEnv,
    *,
    resume: dict[str, Any] | None = None,
    run_fingerprint: str = "",
    clip_id: dict[str, Any] | None = None,
) -> tuple[CmpaHeads, Prototypes, SegDecoder, dict[str, Any]]:
    """Train heads, prototypes and decoder into run folder ``out``; returns them and a summary.

    Rank 0 writes ``checkpoints/last.pt`` (every ``save_every`` steps and at the end),
    ``checkpoints/best.pt`` (the decoder at the best validation mIoU), ``log.jsonl`` and
    ``model.safetensors`` (the final decoder).
    """
    if not items:
        raise DataError("no training image has an image-level label", hint="check --labels and --split")
    prompts = prompt_set(model, vocab, env.device)
    loader = Loader(cfg.workers)
    regions = region_cache(model, items, cfg)
    try:
        heads = load_or_init_heads(model, items, cfg.cmpa_config(), env, prompts, loader, resume)
        decoder = build_decoder(decoder_cfg, cfg.seed, resume)
        joint = Joint(heads, decoder).to(env.device).train()
        optimizer, scheduler = joint_optimizer(heads, decoder, cfg)
        scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        start = 0
        if resume is not None:
            start = restore_training(resume, optimizer=optimizer, scaler=scaler, scheduler=scheduler)
        net = wrap_ddp(joint, env)
        files = open_run_files(out, env, start, cfg.tensorboard, redone_at_last=lambda r: "prototypes" in r)
        loop = SsrLoop(
            ProtoParts(model, heads, net, items, prompts, loader, optimizer, scaler),
            cfg=cfg,
            env=env,
            files=files,
            start=start,
            sync_module=joint,
            resume=resume,
            fingerprint=run_fingerprint,
            clip_id=clip_id,
            val_samples=val_samples,
        )
        loop.setup(dino, decoder, decoder_cfg, scheduler, regions)
        if resume is not None:
            loop.best = dict(resume.get("best") or loop.best)
        protos, summary = loop.complete()
        return heads, protos, decoder, summary
    finally:
        loader.close()
        if regions is not None:
            regions.close()


def save_decoder(out: Path, decoder: SegDecoder, extra: dict[str, Any]) -> Path:
    """``model.safetensors``: the final decoder (what ``ssr predict --model RUN`` loads)."""
    from ssr_cli.onestage.decoder import MODEL_FILE

    return save_model_file(out / MODEL_FILE, decoder, extra)
