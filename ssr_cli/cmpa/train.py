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

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cli.cmpa.config import CmpaConfig
from ssr_cli.cmpa.data import Loader, TrainItem
from ssr_cli.cmpa.loss import similarity_stats
from ssr_cli.cmpa.prototypes import Prototypes, clip_pass, embedding_moment
from ssr_cli.console import info
from ssr_cli.errors import DataError
from ssr_cli.models.cmpa import CmpaHeads, HeadConfig, principal_projection, random_projection
from ssr_cli.train import distributed as D
from ssr_cli.train.log import peak_memory_mb
from ssr_cli.train.loop import open_run_files, sync_device, wrap_ddp
from ssr_cli.train.proto_loop import (
    PromptSet,
    ProtoLoop,
    ProtoParts,
    add_finite,
    head_groups,
    prompt_set,
)
from ssr_cli.train.state import restore_training

# log-window sums: loss, i2t, n_i2t, t2i, n_t2i, same, n_same, other, n_other, steps
WINDOW_SIZE = 10
STAGE = "train-cmpa"  # (its step seeds)


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


def load_or_init_heads(
    model: Any,
    items: list[TrainItem],
    cfg: CmpaConfig,
    env: D.DistEnv,
    prompts: PromptSet,
    loader: Loader,
    resume: dict[str, Any] | None,
) -> CmpaHeads:
    """The heads of checkpoint ``resume``, else the step-0 heads (:func:`init_heads`)."""
    if resume is not None:
        heads = CmpaHeads(HeadConfig.from_dict(resume["head_config"]), cfg.temperature)
        heads.load_state_dict(resume["heads"])
        return heads
    return init_heads(model, items, cfg, env, torch.cat([prompts.fg, prompts.bg]), cfg.precision, loader)


class CmpaLoop(ProtoLoop):
    """train-cmpa's steps: CLIP forward and GradCAM, the prototype loss through the heads."""

    name = STAGE
    timed = ("data", "clip", "heads")
    window_size = WINDOW_SIZE
    sync_what = "the CMPA heads"

    def cams_through_heads(self) -> bool:
        return bool(self.cfg.cam_source == "heads")

    def step(self, it: int) -> torch.Tensor:
        env, device, heads, prompts = self.env, self.env.device, self.heads, self.prompts
        self.begin_step(it)
        t0 = time.perf_counter()
        idx = self.stream.indices(it, env.rank)
        x = self.fetch(it)
        t1 = time.perf_counter()
        present = [list(self.items[i].classes) for i in idx]
        use_heads = self.cams_through_heads()  # else plain CLIP's CAMs
        with torch.no_grad():
            fg_cam = heads.project_text(prompts.fg) if use_heads else prompts.fg
            bg_cam = heads.project_text(prompts.bg) if use_heads else prompts.bg
        head = heads.project_image if use_heads else None
        patches, cams, img_idx, cls_idx = clip_pass(
            self.model, x, present, fg_cam, bg_cam, head, self.precision
        )
        sync_device(device)
        t2 = time.perf_counter()
        step = self.prototype_forward(patches, cams, img_idx, cls_idx)
        touch = step.touch()
        loss = step.loss + 0.0 * touch  # every parameter in the graph, even without anchors (DDP)
        self.update(loss)
        text_live = step.live.detach()
        self.ema(step, cls_idx)
        same, other = similarity_stats(step.feats[step.ok].detach(), cls_idx[step.ok], text_live)
        self.window[0] += loss.detach().double()
        self.window[9] += 1
        for j, v in enumerate((step.stats["loss_i2t"], step.stats["loss_t2i"], same, other)):
            add_finite(self.window, 2 * j + 1, v)  # (sum, count) pairs at 1-2, 3-4, 5-6, 7-8
        sync_device(device)
        t3 = time.perf_counter()
        self.times.add_step((t1 - t0, t2 - t1, t3 - t2))
        return loss.detach()

    def log_window(self, done: int) -> None:
        w = self.reduced_window().tolist()
        speed = self.speed()
        record = {
            "type": "train",
            "iter": done,
            "loss": w[0] / max(w[9], 1),
            "loss_i2t": w[1] / w[2] if w[2] else None,
            "loss_t2i": w[3] / w[4] if w[4] else None,
            "sim_same": w[5] / w[6] if w[6] else None,
            "sim_other": w[7] / w[8] if w[8] else None,
            "temperature": self.heads.temperature,
            "lr": self.optimizer.param_groups[0]["lr"],
            "iters_per_s": round(speed, 4),
            **peak_memory_mb(self.env.device),
            **{f"time_{k}": round(v, 4) for k, v in self.times.window.items()},
        }
        status = f"loss {record['loss']:.4f}  temperature {record['temperature']:.4f}  {speed:.2f} it/s"
        self.report_window(done, record, status)

    def timing_summary(self, seconds: float) -> dict[str, Any]:
        steps = self.cfg.iters - self.start
        timing = self.times.total
        busy = sum(timing.values())
        return {
            "iters_per_s": round(steps / max(seconds, 1e-9), 4),
            "time_share": {key: round(v / busy, 4) for key, v in timing.items()} if busy > 0 else {},
        }


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

    Rank 0 writes ``checkpoints/last.pt`` every ``save_every`` iterations and at the end,
    and ``log.jsonl``. ``resume``: a loaded ``last.pt`` to continue from.
    """
    if not items:
        raise DataError("no training image has an image-level label", hint="check --labels and --split")
    prompts = prompt_set(model, vocab, env.device)
    loader = Loader(cfg.workers)
    try:
        heads = load_or_init_heads(model, items, cfg, env, prompts, loader, resume)
        heads.to(env.device).train()
        optimizer = torch.optim.AdamW(head_groups(heads, cfg.weight_decay), lr=cfg.lr)
        scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        start = 0 if resume is None else restore_training(resume, optimizer=optimizer, scaler=scaler)
        net = wrap_ddp(heads, env)
        files = open_run_files(out, env, start, cfg.tensorboard, redone_at_last=lambda r: "prototypes" in r)
        loop = CmpaLoop(
            ProtoParts(model, heads, net, items, prompts, loader, optimizer, scaler),
            cfg=cfg,
            env=env,
            files=files,
            start=start,
            sync_module=heads,
            resume=resume,
            fingerprint=run_fingerprint,
            clip_id=clip_id,
        )
        protos, summary = loop.complete()
        return heads, protos, summary
    finally:
        loader.close()
