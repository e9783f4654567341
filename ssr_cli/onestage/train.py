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

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.cmpa.data import Loader, SampleStream, TrainItem, step_batch
from ssr_cli.cmpa.loss import prototype_loss
from ssr_cli.cmpa.prototypes import (
    Prototypes,
    ema_update,
    pool_features,
    refresh_prototypes,
    text_prototypes,
    weighted_mean,
)
from ssr_cli.cmpa.train import class_embeddings, init_heads, prompt_embeddings
from ssr_cli.console import ProgressBar, info, progress_enabled
from ssr_cli.errors import DataError
from ssr_cli.models.clip import CLIP_MEAN, CLIP_STD
from ssr_cli.models.cmpa import CmpaHeads, HeadConfig
from ssr_cli.onestage.config import REGION_CELLS, SsrConfig
from ssr_cli.onestage.decoder import (
    DecoderConfig,
    SegDecoder,
    SsrSegmenter,
    capture_blocks,
    layer_tokens,
    save_model_file,
)
from ssr_cli.onestage.pseudo import RegionCache, dino_grid_attention, pseudo_masks
from ssr_cli.runtime import autocast
from ssr_cli.seg.loss import segmentation_loss
from ssr_cli.train import distributed as D
from ssr_cli.train.log import LOG_FILE, log_writer, peak_memory_mb, truncate_log
from ssr_cli.train.state import rng_states, save_checkpoint, set_rng_states, step_seed

STAGE = "train"  # (its step seeds)
PARTS = ("data", "clip", "pseudo", "forward", "update")
# log-window sums: loss, proto, n_proto, seg, n_seg, steps, foreground share of the pseudo-masks
_WINDOW = 7


class Joint(nn.Module):
    """The trained parts in one module (what DistributedDataParallel wraps): CMPA heads + decoder."""

    def __init__(self, heads: CmpaHeads, decoder: SegDecoder) -> None:
        super().__init__()
        self.heads = heads
        self.decoder = decoder

    def forward(
        self, patches: torch.Tensor, prompts: torch.Tensor, tokens: list[torch.Tensor], grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        projected, txt, inv_tau = self.heads(patches, prompts)
        return projected, txt, inv_tau, self.decoder(tokens, grid)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


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
    from ssr_cli.cam.gradcam import gradcam
    from ssr_cli.refine.affinity import fuse_affinity
    from ssr_cli.seg.infer import validation_miou

    device, precision = env.device, cfg.precision
    if not items:
        raise DataError("no training image has an image-level label", hint="check --labels and --split")
    fg_prompts, bg_prompts = (t.to(device) for t in prompt_embeddings(model, vocab))
    fg, bg = class_embeddings(fg_prompts), class_embeddings(bg_prompts)
    k, t_count = fg_prompts.shape[:2]
    flat_prompts = fg_prompts.reshape(k * t_count, -1)
    txt_cls = torch.arange(k, device=device).repeat_interleave(t_count)
    cmpa_cfg = cfg.cmpa_config()
    loader = Loader(cfg.workers)
    side0 = max(model.patch_size, int(round(cfg.size / model.patch_size)) * model.patch_size)
    regions = None
    if cfg.mask == "sgc" and cfg.affinity != "none":  # the mask only masks the affinity's columns
        cells = (side0 // model.patch_size) * REGION_CELLS
        regions = RegionCache([i.image for i in items], side0, cells, cfg.sgc, cfg.workers)
    sources = cfg.affinity.split("+") if cfg.affinity != "none" else []
    weights = dict(zip(("clip", "dino"), cfg.affinity_weights, strict=True))
    try:
        if resume is not None:
            heads = CmpaHeads(HeadConfig.from_dict(resume["head_config"]), cfg.temperature)
            heads.load_state_dict(resume["heads"])
        else:
            heads = init_heads(model, items, cmpa_cfg, env, torch.cat([fg, bg]), precision, loader)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            decoder = SegDecoder(decoder_cfg)
        if resume is not None:
            decoder.load_state_dict(resume["decoder"])
        joint = Joint(heads, decoder).to(device).train()
        decay = [p for n, p in heads.named_parameters() if n != "log_inv_tau"]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                {"params": [heads.log_inv_tau], "weight_decay": 0.0, "lr": cfg.lr},
                {
                    "params": list(decoder.parameters()),
                    "weight_decay": cfg.seg_weight_decay,
                    "lr": cfg.seg_lr,
                },
            ],
            lr=cfg.lr,
        )
        iters = max(cfg.iters, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [lambda s: 1.0, lambda s: 1.0, lambda s: max(0.0, 1.0 - s / iters) ** cfg.poly_power],
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        start, protos = 0, None
        window = torch.zeros(_WINDOW, dtype=torch.float64, device=device)
        best: dict[str, Any] = {"miou": None, "iteration": None}
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            set_rng_states(resume["rng"])
            start = int(resume["iteration"])
            protos = Prototypes.from_state_dict(resume["prototypes"], device)
            best = dict(resume.get("best") or best)
            if env.is_main:  # the saved window is already summed over ranks
                window = resume["window"].to(device=device, dtype=torch.float64)
        net: nn.Module = joint
        if env.enabled:
            net = nn.parallel.DistributedDataParallel(
                joint, device_ids=[device.index] if device.type == "cuda" else None
            )
        stream = SampleStream(len(items), cfg.seed, cfg.batch_size, env.world)
        log_path, ckpt_dir = out / LOG_FILE, out / "checkpoints"
        if env.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(log_path, start, redone_at_last=lambda r: "prototypes" in r)
        write_log, board = log_writer(out, log_path, env.is_main, cfg.tensorboard)
        layers = decoder_cfg.layers
        last_block = len(model.blocks) - 1
        class_names = decoder_cfg.class_names
        segmenter = SsrSegmenter(model, decoder, precision)
        cam_target = None if cfg.cam_target == "auto" else cfg.cam_target

        def batch_of(it: int) -> tuple[list[int], int, list[Any]]:
            return step_batch(stream, cfg, it, env.rank, model.patch_size)

        def jobs(it: int) -> list[tuple[Path, int, Any]]:
            idx, side, augs = batch_of(it)
            return [(items[i].image, side, a) for i, a in zip(idx, augs, strict=True)]

        timing = dict.fromkeys((*PARTS, "protos", "val", "superpixels"), 0.0)
        wtime = dict.fromkeys(PARTS, 0.0)
        bar_box: list[Any] = [None]

        def refresh(it: int) -> Prototypes:
            found, seconds = refresh_prototypes(
                "train",
                it,
                model=model,
                heads=heads,
                items=items,
                cfg=cfg,
                prompts=(fg_prompts, bg_prompts),
                cams=(fg, bg, True),
                precision=precision,
                env=env,
                loader=loader,
                pick_seed=step_seed(cfg.seed, it, 0, STAGE) % 2**31,
                bar=bar_box[0],
                write_log=write_log,
            )
            timing["protos"] += seconds
            return found

        def checkpoint_state(iteration: int) -> dict[str, Any]:
            assert protos is not None
            return {
                "iteration": iteration,
                "heads": heads.state_dict(),
                "head_config": heads.cfg.to_dict(),
                "decoder": decoder.state_dict(),
                "decoder_config": decoder_cfg.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "prototypes": protos.state_dict(),
                "rng": rng_states(),
                "window": D.all_reduce_sum(env, window.clone()).cpu(),
                "best": best,
                "config": cfg.to_dict(),
                "fingerprint": run_fingerprint,
                "clip": clip_id or {},
            }

        started = time.perf_counter()
        clock = {"start": time.perf_counter(), "steps": 0}
        last: dict[str, Any] = {}
        with (
            ProgressBar("train", total=cfg.iters, completed=start)
            if env.is_main
            else contextlib.nullcontext() as bar
        ):
            bar_box[0] = bar
            for it in range(start, cfg.iters):
                if it % cfg.proto_every == 0 or protos is None:
                    protos = refresh(it)
                torch.manual_seed(step_seed(cfg.seed, it, env.rank, STAGE))
                t0 = time.perf_counter()
                idx, _side, augs = batch_of(it)
                for ahead in range(it + 1, min(it + 1 + loader.ahead, cfg.iters)):
                    loader.submit(("train", ahead), jobs(ahead))
                    if regions is not None:
                        regions.submit(stream.indices(ahead, env.rank))
                x = loader.get(("train", it), jobs(it)).to(device)
                t1 = time.perf_counter()
                present = [list(items[i].classes) for i in idx]
                with torch.no_grad():
                    fg_cam, bg_cam = heads.project_text(fg), heads.project_text(bg)
                with capture_blocks(model, layers) as found_tokens:
                    tokens = model.image_tokens(
                        x,
                        grad_last_block=False,
                        precision=precision,
                        attn_blocks=cfg.clip_blocks if "clip" in sources else None,
                    )
                cams = gradcam(
                    model,
                    tokens,
                    present,
                    fg_cam,
                    bg_cam,
                    image_head=heads.project_image,
                    precision=precision,
                    target=cam_target,
                )
                with torch.no_grad():
                    patches = model.patch_embeddings(tokens).detach()
                feats_in = layer_tokens(found_tokens, tokens.post, layers, last_block)
                pairs = [(i, c) for i, classes in enumerate(present) for c in classes]
                img_idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
                cls_idx = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
                flat = torch.cat([c.flatten(1) for c in cams], dim=0).to(device).float()
                _sync(device)
                t2 = time.perf_counter()
                with torch.no_grad():
                    attn: dict[str, torch.Tensor] = {}
                    if "clip" in sources:
                        assert tokens.attn is not None
                        attn["clip"] = tokens.attn.float()
                    if "dino" in sources:
                        attn["dino"] = dino_grid_attention(dino, x, tokens.grid, cfg.dino_blocks, precision)
                    affinity = fuse_affinity(attn, weights) if attn else None
                    waited = time.perf_counter()
                    maps = None if regions is None else [regions.get(i) for i in idx]
                    waited = time.perf_counter() - waited  # superpixels: once per image, not step time
                    timing["superpixels"] += waited
                    clock["start"] += waited
                    target = pseudo_masks(cams, present, affinity, maps, [a.flip for a in augs], cfg).to(
                        device
                    )
                _sync(device)
                t3 = time.perf_counter() - waited
                if cfg.pool == "tokens":  # as train-cmpa: ISA(CAM-weighted mean token)
                    pooled, ok = weighted_mean(flat, patches, img_idx)
                    with autocast(device, precision):
                        projected, txt, inv_tau, logits = net(pooled, flat_prompts, feats_in, tokens.grid)
                    feats = F.normalize(projected.float(), dim=-1)
                else:
                    with autocast(device, precision):
                        projected, txt, inv_tau, logits = net(patches, flat_prompts, feats_in, tokens.grid)
                    feats, ok = pool_features(flat, projected, img_idx)
                txt_feats = F.normalize(txt.float(), dim=-1)
                live = F.normalize(txt_feats.view(k, t_count, -1).mean(dim=1), dim=-1)
                l_proto, _stats = prototype_loss(
                    feats[ok],
                    cls_idx[ok],
                    txt_feats,
                    txt_cls,
                    protos,
                    inv_tau.float(),
                    text_live=live if cfg.text_target == "live" else None,
                )
                _sync(device)
                t4 = time.perf_counter() - waited
                logits = F.interpolate(
                    logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
                )
                l_seg = segmentation_loss(logits, target, cfg.seg_loss)
                touch = projected.float().sum() + txt.float().sum()
                loss = l_proto + cfg.gamma * l_seg + 0.0 * touch  # every parameter in the graph (DDP)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if cfg.proto_ema > 0:
                    with torch.no_grad():
                        bg_live = text_prototypes(heads.project_text, bg_prompts)
                    ema_update(protos, feats[ok], cls_idx[ok], live.detach(), bg_live, cfg.proto_ema, env)
                window[0] += loss.detach().double()
                for j, v in ((1, l_proto), (3, l_seg)):
                    if bool(torch.isfinite(v.detach())):
                        window[j] += v.detach().double()
                        window[j + 1] += 1
                window[5] += 1
                labelled = target != 255
                window[6] += float(((target > 0) & labelled).sum()) / max(int(labelled.sum()), 1)
                _sync(device)
                t5 = time.perf_counter() - waited
                # forward: heads, decoder, prototype loss; update: segmentation loss, backward, step
                for key, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    timing[key] += dt
                    wtime[key] += dt
                clock["steps"] += 1
                done = it + 1

                if done % cfg.log_every == 0 or done == cfg.iters:
                    w = D.all_reduce_sum(env, window.clone()).tolist()
                    seconds = time.perf_counter() - clock["start"]
                    busy = sum(wtime.values())
                    speed = clock["steps"] / max(seconds, 1e-9)
                    last = {
                        "type": "train",
                        "iter": done,
                        "loss": w[0] / max(w[5], 1),
                        "loss_proto": w[1] / w[2] if w[2] else None,
                        "loss_seg": w[3] / w[4] if w[4] else None,
                        "pseudo_fg": w[6] / max(w[5], 1),
                        "temperature": heads.temperature,
                        "lr": optimizer.param_groups[0]["lr"],
                        "seg_lr": optimizer.param_groups[2]["lr"],
                        "iters_per_s": round(speed, 4),
                        "seconds_per_iter": round(1 / max(speed, 1e-9), 4),
                        "pseudo_share": round(wtime["pseudo"] / busy, 4) if busy > 0 else None,
                        **peak_memory_mb(device),
                        **{f"time_{k}": round(v, 4) for k, v in wtime.items()},
                    }
                    write_log(last)
                    status = f"loss {last['loss']:.4f}  {speed:.2f} it/s"
                    if bar is not None:
                        bar.update(advance=int(clock["steps"]), status=status)
                    if env.is_main and not progress_enabled():
                        info(f"train: iteration {done}/{cfg.iters}  {status}")
                    window.zero_()
                    wtime.update(dict.fromkeys(PARTS, 0.0))
                    clock.update(start=time.perf_counter(), steps=0)

                paused = time.perf_counter()
                if cfg.check_sync_every and done % cfg.check_sync_every == 0:
                    D.check_ranks_agree(env, joint, float(loss.detach()), done, write_log)

                if val_samples and (done == cfg.iters or (cfg.val_every and done % cfg.val_every == 0)):
                    if bar is not None:
                        bar.update(advance=0, status=f"validating {len(val_samples)} images")
                    result = validation_miou(
                        segmenter,
                        val_samples,
                        decoder_cfg.num_classes,
                        class_names,
                        CLIP_MEAN,
                        CLIP_STD,
                        env,
                        precision,
                    )
                    miou = result["miou"]
                    improved = miou is not None and (best["miou"] is None or miou > best["miou"])
                    if improved:
                        best = {"miou": miou, "iteration": done}
                    write_log({"type": "val", "iter": done, "val_miou": miou, "best_miou": best["miou"]})
                    if env.is_main:
                        info(f"train: iteration {done}: validation mIoU {_pct(miou)}")
                        if improved:
                            save_checkpoint(
                                ckpt_dir / "best.pt",
                                {
                                    "iteration": done,
                                    "decoder": decoder.state_dict(),
                                    "miou": miou,
                                    "decoder_config": decoder_cfg.to_dict(),
                                    "fingerprint": run_fingerprint,
                                },
                            )
                    joint.train()

                if done % cfg.save_every == 0 or done == cfg.iters:
                    state = checkpoint_state(done)
                    if env.is_main:
                        save_checkpoint(ckpt_dir / "last.pt", state)
                    D.barrier(env)
                pause = time.perf_counter() - paused
                timing["val"] += pause
                clock["start"] += pause  # validation and checkpoints are not step time
        if protos is None:  # --iters 0
            protos = refresh(start)
        digests = D.all_gather_object(env, D.parameter_digest(joint))
        seconds = time.perf_counter() - started
        steps = cfg.iters - start
        busy = sum(timing[key] for key in PARTS)
        summary = {
            "iterations": cfg.iters,
            "resumed_from": start,
            "final": last,
            "best": best,
            "temperature": heads.temperature,
            "seconds": round(seconds, 2),
            "seconds_per_iter": round(busy / steps, 4) if steps else None,
            "time_share": {key: round(timing[key] / busy, 4) for key in PARTS} if busy > 0 else {},
            "pseudo_share": round(timing["pseudo"] / busy, 4) if busy > 0 else None,
            "prototype_seconds": round(timing["protos"], 2),
            "superpixel_seconds": round(timing["superpixels"], 2),
            "rank_digests": digests,
            **peak_memory_mb(device),
        }
        if board is not None:
            board.close()
        return heads, protos, decoder, summary
    finally:
        loader.close()
        if regions is not None:
            regions.close()


def save_decoder(out: Path, decoder: SegDecoder, extra: dict[str, Any]) -> Path:
    """``model.safetensors``: the final decoder (what ``ssr predict --model RUN`` loads)."""
    from ssr_cli.onestage.decoder import MODEL_FILE

    return save_model_file(out / MODEL_FILE, decoder, extra)
