"""The CMPA training loop (single process, or DistributedDataParallel under torchrun).

One step: decode the step's augmented batch; frozen CLIP forward and GradCAM of the
image's present classes (in the space of the current heads, or plain CLIP's with
``cam_source="clip"``); CAM-weighted features of ISA(projected patch tokens); TSA
features of every class prompt; the prototype contrastive loss (``loss.py``); AdamW
on ISA, TSA and the temperature. Prototypes are refreshed by a pass over the whole
split at iterations 0, ``proto_every``, 2 ``proto_every``, ..., and moved by EMA after
every step when ``proto_ema`` > 0.

Exact resume: the batch and its augmentation are pure functions of (seed, iteration,
rank) (``data.py``); torch's RNG is re-seeded from them every step; the checkpoint
holds heads, optimizer, AMP scaler, prototypes, RNG states and the partial log
window, so a run resumed from ``last.pt`` logs the same losses as one never stopped.

Imports torch: import lazily.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.cmpa.data import Loader, SampleStream, TrainItem, step_batch
from ssr_cli.cmpa.loss import prototype_loss, similarity_stats
from ssr_cli.cmpa.prototypes import (
    Prototypes,
    clip_pass,
    ema_update,
    embedding_moment,
    pool_features,
    refresh_prototypes,
    text_prototypes,
    weighted_mean,
)
from ssr_cli.console import ProgressBar, info, progress_enabled
from ssr_cli.errors import DataError
from ssr_cli.models.cmpa import CmpaHeads, HeadConfig, principal_projection, random_projection
from ssr_cli.runtime import autocast
from ssr_cli.train import distributed as D
from ssr_cli.train.log import LOG_FILE, log_writer, peak_memory_mb, truncate_log
from ssr_cli.train.state import step_seed

# log-window sums: loss, i2t, n_i2t, t2i, n_t2i, same, n_same, other, n_other, steps
_WINDOW = 10
STAGE = "train-cmpa"  # (its step seeds)


def prompt_embeddings(model: Any, vocab: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes [K, T, E], background [B, T, E]): CLIP's normalised embedding of every
    template filled with every class prompt / background word (one text pass)."""
    templates = list(vocab.templates)
    words = list(vocab.prompts) + list(vocab.background)
    encoded = model.encode_text([t.format(w) for w in words for t in templates])
    per = encoded.view(len(words), len(templates), -1)
    k = len(vocab.prompts)
    return per[:k].contiguous(), per[k:].contiguous()


def class_embeddings(prompts: torch.Tensor) -> torch.Tensor:
    """[K, T, E] -> [K, E]: normalise(mean over templates), as ``cam.prompts.text_embeddings``."""
    return F.normalize(prompts.mean(dim=1), dim=-1)


def init_heads(
    model: Any,
    items: list[TrainItem],
    cfg: CmpaConfig,
    env: D.DistEnv,
    texts: torch.Tensor,
    precision: str,
    loader: Loader,
) -> CmpaHeads:
    """The step-0 heads (see ``models/cmpa.py``): ``texts`` [T, E] are the class and
    background embeddings whose span the ``pca`` projection keeps exactly."""
    e = int(model.embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # fc1's initial weights
        heads = CmpaHeads(HeadConfig(e, cfg.dim, cfg.hidden, cfg.head_init), cfg.temperature)
    if cfg.head_init == "random" or cfg.dim >= e:
        weight = random_projection(e, cfg.dim, cfg.seed)
    else:
        order = np.random.default_rng([cfg.seed, 0x1417]).permutation(len(items))[: cfg.init_images]
        if env.is_main:
            info(f"train-cmpa: initial projection from {len(order)} image embeddings")
        moment = embedding_moment(
            model, items, order.tolist(), cfg.size, cfg.batch_size, precision, env, loader
        )
        weight = principal_projection(texts.cpu(), moment, cfg.dim, cfg.seed)
    heads.set_projection(weight)
    return heads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    out: Path,
    model: Any,
    items: list[TrainItem],
    vocab: Any,
    cfg: CmpaConfig,
    env: D.DistEnv,
    *,
    resume: dict[str, Any] | None = None,
    run_fingerprint: str = "",
    clip_id: dict[str, Any] | None = None,
) -> tuple[CmpaHeads, Prototypes, dict[str, Any]]:
    """Train CMPA heads into run folder ``out``; returns (heads, prototypes, summary).

    Rank 0 writes ``checkpoints/last.pt`` every ``save_every`` iterations and at the
    end, and ``log.jsonl``. ``resume``: a loaded ``last.pt`` to continue from.
    """
    from ssr_cli.train.state import rng_states, save_checkpoint, set_rng_states

    device, precision = env.device, cfg.precision
    if not items:
        raise DataError("no training image has an image-level label", hint="check --labels and --split")
    fg_prompts, bg_prompts = (t.to(device) for t in prompt_embeddings(model, vocab))
    fg, bg = class_embeddings(fg_prompts), class_embeddings(bg_prompts)
    k, t_count = fg_prompts.shape[:2]
    flat_prompts = fg_prompts.reshape(k * t_count, -1)
    txt_cls = torch.arange(k, device=device).repeat_interleave(t_count)
    loader = Loader(cfg.workers)
    try:
        if resume is not None:
            heads = CmpaHeads(HeadConfig.from_dict(resume["head_config"]), cfg.temperature)
            heads.load_state_dict(resume["heads"])
        else:
            heads = init_heads(model, items, cfg, env, torch.cat([fg, bg]), precision, loader)
        heads.to(device).train()
        decay = [p for n, p in heads.named_parameters() if n != "log_inv_tau"]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": [heads.log_inv_tau], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        start, protos, window = 0, None, torch.zeros(_WINDOW, dtype=torch.float64, device=device)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            set_rng_states(resume["rng"])
            start = int(resume["iteration"])
            protos = Prototypes.from_state_dict(resume["prototypes"], device)
            if env.is_main:  # the saved window is already summed over ranks
                window = resume["window"].to(device=device, dtype=torch.float64)
        net: torch.nn.Module = heads
        if env.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                heads, device_ids=[device.index] if device.type == "cuda" else None
            )
        stream = SampleStream(len(items), cfg.seed, cfg.batch_size, env.world)
        log_path, ckpt_dir = out / LOG_FILE, out / "checkpoints"
        if env.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(log_path, start, redone_at_last=lambda r: "prototypes" in r)  # refreshed again

        write_log, board = log_writer(out, log_path, env.is_main, cfg.tensorboard)

        def jobs(it: int) -> list[tuple[Path, int, Any]]:
            idx, side, augs = step_batch(stream, cfg, it, env.rank, model.patch_size)
            return [(items[i].image, side, a) for i, a in zip(idx, augs, strict=True)]

        timing = {"data": 0.0, "clip": 0.0, "heads": 0.0, "protos": 0.0}
        wtime = {"data": 0.0, "clip": 0.0, "heads": 0.0}  # this log window's step time, by part
        bar_box: list[Any] = [None]

        def refresh(it: int) -> Prototypes:
            found, seconds = refresh_prototypes(
                "train-cmpa",
                it,
                model=model,
                heads=heads,
                items=items,
                cfg=cfg,
                prompts=(fg_prompts, bg_prompts),
                cams=(fg, bg, cfg.cam_source == "heads"),
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
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "prototypes": protos.state_dict(),
                "rng": rng_states(),
                "window": D.all_reduce_sum(env, window.clone()).cpu(),
                "config": cfg.to_dict(),
                "fingerprint": run_fingerprint,
                "clip": clip_id or {},
            }

        started = time.perf_counter()
        clock = {"start": time.perf_counter(), "steps": 0}
        last: dict[str, Any] = {}
        with (
            ProgressBar("train-cmpa", total=cfg.iters, completed=start)
            if env.is_main
            else contextlib.nullcontext() as bar
        ):
            bar_box[0] = bar
            for it in range(start, cfg.iters):
                if it % cfg.proto_every == 0 or protos is None:
                    protos = refresh(it)
                torch.manual_seed(step_seed(cfg.seed, it, env.rank, STAGE))
                t0 = time.perf_counter()
                idx = stream.indices(it, env.rank)
                for ahead in range(it + 1, min(it + 1 + loader.ahead, cfg.iters)):
                    loader.submit(("train", ahead), jobs(ahead))
                x = loader.get(("train", it), jobs(it)).to(device)
                t1 = time.perf_counter()
                present = [list(items[i].classes) for i in idx]
                with torch.no_grad():
                    use_heads = cfg.cam_source == "heads"
                    fg_cam = heads.project_text(fg) if use_heads else fg
                    bg_cam = heads.project_text(bg) if use_heads else bg
                head = heads.project_image if cfg.cam_source == "heads" else None
                patches, cams, img_idx, cls_idx = clip_pass(
                    model, x, present, fg_cam, bg_cam, head, precision
                )
                _sync(device)
                t2 = time.perf_counter()
                if cfg.pool == "tokens":  # ISA(CAM-weighted mean token): the CAM's ISA(mean token) form
                    pooled, ok = weighted_mean(cams, patches, img_idx)
                    with autocast(device, precision):
                        projected, txt, inv_tau = net(pooled, flat_prompts)
                    feats = F.normalize(projected.float(), dim=-1)
                else:
                    with autocast(device, precision):
                        projected, txt, inv_tau = net(patches, flat_prompts)
                    feats, ok = pool_features(cams, projected, img_idx)
                txt_feats = F.normalize(txt.float(), dim=-1)
                live = F.normalize(txt_feats.view(k, t_count, -1).mean(dim=1), dim=-1)
                loss, stats = prototype_loss(
                    feats[ok],
                    cls_idx[ok],
                    txt_feats,
                    txt_cls,
                    protos,
                    inv_tau.float(),
                    text_live=live if cfg.text_target == "live" else None,
                )
                touch = projected.float().sum() + txt.float().sum()
                loss = loss + 0.0 * touch  # every parameter in the graph, even without anchors (DDP)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                text_live = live.detach()
                if cfg.proto_ema > 0:
                    with torch.no_grad():
                        bg_live = text_prototypes(heads.project_text, bg_prompts)
                    ema_update(protos, feats[ok], cls_idx[ok], text_live, bg_live, cfg.proto_ema, env)
                same, other = similarity_stats(feats[ok].detach(), cls_idx[ok], text_live)
                window[0] += loss.detach().double()
                window[9] += 1
                for j, v in enumerate((stats["loss_i2t"], stats["loss_t2i"], same, other)):
                    if bool(torch.isfinite(v)):  # (sum, count) pairs at 1-2, 3-4, 5-6, 7-8
                        window[2 * j + 1] += v.double()
                        window[2 * j + 2] += 1
                _sync(device)
                t3 = time.perf_counter()
                for key, dt in (("data", t1 - t0), ("clip", t2 - t1), ("heads", t3 - t2)):
                    timing[key] += dt
                    wtime[key] += dt
                clock["steps"] += 1
                done = it + 1

                if done % cfg.log_every == 0 or done == cfg.iters:
                    w = D.all_reduce_sum(env, window.clone()).tolist()
                    seconds = time.perf_counter() - clock["start"]
                    speed = clock["steps"] / max(seconds, 1e-9)
                    last = {
                        "type": "train",
                        "iter": done,
                        "loss": w[0] / max(w[9], 1),
                        "loss_i2t": w[1] / w[2] if w[2] else None,
                        "loss_t2i": w[3] / w[4] if w[4] else None,
                        "sim_same": w[5] / w[6] if w[6] else None,
                        "sim_other": w[7] / w[8] if w[8] else None,
                        "temperature": heads.temperature,
                        "lr": optimizer.param_groups[0]["lr"],
                        "iters_per_s": round(speed, 4),
                        **peak_memory_mb(device),
                        **{f"time_{k}": round(v, 4) for k, v in wtime.items()},
                    }
                    write_log(last)
                    status = (
                        f"loss {last['loss']:.4f}  temperature {last['temperature']:.4f}  {speed:.2f} it/s"
                    )
                    if bar is not None:
                        bar.update(advance=int(clock["steps"]), status=status)
                    if env.is_main and not progress_enabled():
                        info(f"train-cmpa: iteration {done}/{cfg.iters}  {status}")
                    window.zero_()
                    wtime.update(data=0.0, clip=0.0, heads=0.0)
                    clock.update(start=time.perf_counter(), steps=0)

                if cfg.check_sync_every and done % cfg.check_sync_every == 0:
                    D.check_ranks_agree(env, heads, float(loss.detach()), done, write_log, "the CMPA heads")

                if done % cfg.save_every == 0 or done == cfg.iters:
                    state = checkpoint_state(done)
                    if env.is_main:
                        save_checkpoint(ckpt_dir / "last.pt", state)
                    D.barrier(env)
        if protos is None:  # --iters 0: the step-0 heads and prototypes
            protos = refresh(start)
        digests = D.all_gather_object(env, D.parameter_digest(heads))
        seconds = time.perf_counter() - started
        steps = cfg.iters - start
        busy = sum(timing.values())
        summary = {
            "iterations": cfg.iters,
            "resumed_from": start,
            "final": last,
            "temperature": heads.temperature,
            "seconds": round(seconds, 2),
            "iters_per_s": round(steps / max(seconds, 1e-9), 4),
            "time_share": {key: round(v / busy, 4) for key, v in timing.items()} if busy > 0 else {},
            "rank_digests": digests,
            **peak_memory_mb(device),
        }
        if board is not None:
            board.close()
        return heads, protos, summary
    finally:
        loader.close()
