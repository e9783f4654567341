"""The segmenter's training loop (single process or DistributedDataParallel under torchrun).

Recipe defaults: the optimizer settings depend on the head and come from
``ssr_cli.seg.recipes`` (DeepLabV2: kazuto1011/deeplab-pytorch as CLIP-ES trains it;
DeepLabV3/V3+: VainF/DeepLabV3Plus-Pytorch); shared by all heads: crop 321, batch 10,
random scale 0.5-1.5 and flips, 255 ignored. The optimizer has one group per (part, kind)
of parameter: backbone at ``lr``, head weights at ``lr * head_lr_mult``, head biases at
``lr * head_bias_lr_mult``; biases and norm parameters without weight decay unless
``bias_decay`` / ``norm_decay``; ``freeze_bn`` keeps BatchNorm in eval mode, untrained.

Exact resume: the data stream is stateless (``data.py``), torch's global RNG is
re-seeded from (seed, iteration, rank) at every step, and the checkpoint holds
model, optimizer, scheduler, AMP scaler and RNG states; so a run resumed from
``last.pt`` at iteration i computes the same steps as one never interrupted
(bit-exact on the CPU).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssr_cli.console import info, progress_enabled
from ssr_cli.errors import SSRError
from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
from ssr_cli.procs import worker_guard
from ssr_cli.runtime import autocast
from ssr_cli.seg.checkpoint import MODEL_FILE, save_model_file
from ssr_cli.seg.config import OPTIMIZERS, TrainConfig
from ssr_cli.seg.data import Sample, StreamLayout, TrainStream, clean_worker_error
from ssr_cli.seg.infer import validation_miou
from ssr_cli.seg.loss import segmentation_loss
from ssr_cli.train import distributed as D
from ssr_cli.train.log import peak_memory_mb
from ssr_cli.train.loop import RunFiles, StepTimes, TrainLoop, open_run_files, wrap_ddp
from ssr_cli.train.state import restore_training, rng_states, step_seed

__all__ = ["OPTIMIZERS", "TrainConfig", "build_optimizer", "optimizer_groups", "train"]


class _Batches:
    """``batch_sampler`` for the DataLoader: this rank's position lists from ``start`` on."""

    def __init__(self, layout: StreamLayout, start: int, stop: int, rank: int) -> None:
        self.layout, self.start, self.stop, self.rank = layout, start, stop, rank

    def __iter__(self) -> Iterator[list[int]]:
        return self.layout.batches(self.start, self.stop, self.rank)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.layout.accum


GROUP_ORDER = (
    ("backbone", "weight"),
    ("backbone", "bias"),
    ("backbone", "norm"),
    ("head", "weight"),
    ("head", "bias"),
    ("head", "norm"),
)


def optimizer_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one per (part, kind) that has trainable parameters,
    in :data:`GROUP_ORDER` (so the first is the backbone's weights at ``cfg.lr``).

    Learning rate: backbone ``lr``; head weights and norms ``lr * head_lr_mult``; head
    biases ``lr * head_bias_lr_mult``. Weight decay: ``weight_decay`` on weights, on biases
    only with ``bias_decay``, on norm parameters only with ``norm_decay``. Each group has a
    ``name`` ("head.bias") and its multiplier ``lr_mult``.
    """
    found: dict[tuple[str, str], list[torch.nn.Parameter]] = {key: [] for key in GROUP_ORDER}
    for part, kind, param in model.parameter_kinds():
        found[(part, kind)].append(param)
    groups = []
    for (part, kind), params in found.items():
        if not params:
            continue
        mult = 1.0 if part == "backbone" else (cfg.head_bias_lr_mult if kind == "bias" else cfg.head_lr_mult)
        decays = {"weight": True, "bias": cfg.bias_decay, "norm": cfg.norm_decay}[kind]
        groups.append(
            {
                "params": params,
                "name": f"{part}.{kind}",
                "lr_mult": mult,
                "lr": cfg.lr * mult,
                "weight_decay": cfg.weight_decay if decays else 0.0,
            }
        )
    return groups


def build_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = optimizer_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_model(model_cfg: SegmenterConfig, cfg: TrainConfig, env: D.DistEnv, backbone_state: Any) -> Any:
    """The segmenter on its device, in training mode; its initial weights follow ``--seed``."""
    torch.manual_seed(cfg.seed)  # the head's (and a random backbone's) initial weights follow --seed
    model: Any = build_segmenter(model_cfg, backbone_state)
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    if cfg.sync_bn and env.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device).train()
    return model


def train_batches(
    samples: Sequence[Sample], model_cfg: SegmenterConfig, cfg: TrainConfig, env: D.DistEnv, start: int
) -> Iterator[Any]:
    """This rank's (images, masks) micro-batches from iteration ``start`` on (worker processes start
    here: the DataLoader draws its workers' base seed from torch's RNG)."""
    stream = TrainStream(
        samples,
        model_cfg.num_classes,
        cfg.seed,
        cfg.crop_size,
        model_cfg.mean,
        model_cfg.std,
        cfg.scale_range,
        cfg.flip,
    )
    layout = StreamLayout(cfg.batch_size, cfg.accum, env.world)
    loader = DataLoader(
        stream,
        batch_sampler=_Batches(layout, start, cfg.iters, env.rank),
        num_workers=cfg.workers,
        pin_memory=env.device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
        worker_init_fn=worker_guard(),
    )
    return iter(loader)


class SegLoop(TrainLoop):
    """fit-seg's steps (``accum`` micro-batches each), log window, validation and checkpoints."""

    name = "fit-seg"

    def __init__(
        self,
        *,
        model: Any,
        net: Any,
        batches: Iterator[Any],
        opt: tuple[Any, Any, Any],
        configs: tuple[SegmenterConfig, TrainConfig],
        env: D.DistEnv,
        files: RunFiles,
        start: int,
        best: dict[str, Any],
        fingerprint: str,
        val_samples: Sequence[Sample],
    ) -> None:
        """``opt``: (optimizer, scheduler, AMP scaler); ``best``: the best validation so far."""
        model_cfg, cfg = configs
        super().__init__(env, cfg, files, start, model, val_samples)
        self.model, self.net, self.batches, self.best = model, net, batches, best
        self.model_cfg, self.fingerprint = model_cfg, fingerprint
        self.optimizer, self.scheduler, self.scaler = opt
        self.images_per_step = cfg.batch_size * cfg.accum * env.world
        self.class_names = model_cfg.class_names or tuple(str(i) for i in range(model_cfg.num_classes))
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        self.times = StepTimes(("data",))  # the log window's data time and clock
        self.last_loss: float | None = None

    def step(self, it: int) -> torch.Tensor:
        cfg, env, device = self.cfg, self.env, self.env.device
        torch.manual_seed(step_seed(cfg.seed, it, env.rank))
        step_losses = []
        for micro in range(cfg.accum):
            t_data = time.perf_counter()
            try:
                x, y = next(self.batches)
            except SSRError as exc:
                raise clean_worker_error(exc) from None
            self.times.add("data", time.perf_counter() - t_data)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = micro == cfg.accum - 1
            sync = self.net.no_sync() if env.enabled and not last else contextlib.nullcontext()
            with sync:
                with autocast(device, cfg.precision):
                    logits = self.net(x)
                loss = segmentation_loss(logits, y, cfg.loss)
                self.scaler.scale(loss / cfg.accum).backward()
            step_losses.append(loss.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        step_loss = torch.stack(step_losses).double().mean()
        self.loss_sum += step_loss
        self.times.steps += 1
        done = it + 1
        if done - self.start == CPU_ESTIMATE_STEPS and device.type == "cpu" and env.is_main:
            seconds = time.perf_counter() - self.started
            announce_cpu_time(seconds, done - self.start, cfg.iters - done, cfg)
        return step_loss

    def log_window(self, done: int) -> None:
        env, steps = self.env, self.times.steps
        reduced = D.all_reduce_sum(env, self.loss_sum.clone()) / env.world
        seconds = self.times.seconds()
        self.last_loss = float(reduced) / steps
        speed = steps * self.images_per_step / max(seconds, 1e-9)
        record = {
            "type": "train",
            "iter": done,
            "loss": self.last_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": round(speed, 3),
            "data_share": round(self.times.window["data"] / max(seconds, 1e-9), 4),
            **peak_memory_mb(env.device),
        }
        self.report(done, record, f"loss {self.last_loss:.4f}  {speed:.2f} img/s", steps)
        self.loss_sum.zero_()
        self.times.reset()

    def paused(self, seconds: float) -> None:
        self.times.pause(seconds)  # validation and checkpoint time is left out of the throughput

    def validate(self, done: int) -> None:
        env, bar, model, model_cfg, val_samples = (
            self.env,
            self.bar,
            self.model,
            self.model_cfg,
            self.val_samples,
        )
        D.broadcast_buffers(env, model)
        if env.is_main and not progress_enabled():
            info(f"fit-seg: iteration {done}: validating on {len(val_samples)} images")

        def val_status(seen: int, total: int) -> None:
            if bar is not None:
                bar.update(advance=0, status=f"validating {seen}/{total}")

        val_status(0, -(-len(val_samples) // env.world))
        result = validation_miou(
            model,
            val_samples,
            model_cfg.num_classes,
            self.class_names,
            model_cfg.mean,
            model_cfg.std,
            env,
            self.cfg.precision,
            progress=val_status,
        )
        miou = result["miou"]

        def best_state() -> dict[str, Any]:
            return {
                "iteration": done,
                "model": model.state_dict(),
                "miou": miou,
                "model_config": model_cfg.to_dict(),
                "fingerprint": self.fingerprint,
            }

        self.validated(done, miou, best_state, bar_status=True)

    def checkpoint_state(self, done: int) -> dict[str, Any]:
        return {
            "iteration": done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(),
            "best": self.best,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
        }

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        steps = self.cfg.iters - self.start
        return {
            "iterations": self.cfg.iters,
            "resumed_from": self.start,
            "final_loss": self.last_loss,
            "best": self.best,
            "seconds": round(seconds, 2),
            "images_per_s": round(steps * self.images_per_step / max(seconds, 1e-9), 3),
            **peak_memory_mb(self.env.device),
        }


def train(
    out: Path,
    model_cfg: SegmenterConfig,
    cfg: TrainConfig,
    samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    env: D.DistEnv,
    backbone_state: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    run_fingerprint: str = "",
) -> dict[str, Any]:
    """Train a segmenter into run folder ``out``; returns a summary for the manifest.

    Writes (rank 0 only) ``checkpoints/last.pt`` every ``save_every`` iterations and at
    the end, ``checkpoints/best.pt`` when validation mIoU improves, ``log.jsonl`` and
    the final ``model.safetensors``. ``resume``: a loaded ``last.pt`` to continue from.
    """
    model = build_model(model_cfg, cfg, env, backbone_state)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / cfg.iters) ** cfg.poly_power
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    start = 0
    best: dict[str, Any] = {"miou": None, "iteration": None}
    if resume is not None:
        model.load_state_dict(resume["model"])
        start = restore_training(resume, optimizer=optimizer, scaler=scaler, scheduler=scheduler)
        best = dict(resume.get("best") or best)
    net = wrap_ddp(model, env)
    batches = train_batches(samples, model_cfg, cfg, env, start)
    files = open_run_files(out, env, start, cfg.tensorboard)
    loop = SegLoop(
        model=model,
        net=net,
        batches=batches,
        opt=(optimizer, scheduler, scaler),
        configs=(model_cfg, cfg),
        env=env,
        files=files,
        start=start,
        best=best,
        fingerprint=run_fingerprint,
        val_samples=val_samples,
    )
    loop.run()
    files.close()
    if env.is_main:
        save_model_file(out / MODEL_FILE, model.state_dict(), model_cfg)
    D.barrier(env)
    return loop.summary()


CPU_ESTIMATE_STEPS = 3  # steps timed before the one-time CPU estimate (the first includes warm-up)


def announce_cpu_time(seconds: float, steps: int, remaining: int, cfg: Any) -> None:
    """Once, early in a CPU run: how long the remaining iterations take at the measured speed.

    The defaults are the paper's recipe, sized for a GPU; a CPU user learns the cost at once."""
    per_step = seconds / max(steps, 1)
    total = per_step * remaining
    hours, rest = divmod(int(total), 3600)
    when = f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"
    advice = (
        " The defaults are the GPU recipe; for a CPU try --backbone resnet18 --iters 2000 --batch-size 4 "
        "(docs/METHOD.md section 5)"
        if total > 600
        else ""
    )
    info(
        f"fit-seg on the CPU: {per_step:.2f} s per iteration (batch {cfg.batch_size}, crop {cfg.crop_size}), "
        f"so the remaining {remaining:,} iterations take about {when}.{advice}"
    )
