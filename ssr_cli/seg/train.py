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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssr_cli.console import ProgressBar, info, progress_enabled
from ssr_cli.errors import ConfigError, SSRError
from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
from ssr_cli.procs import worker_guard
from ssr_cli.runtime import autocast
from ssr_cli.seg.checkpoint import MODEL_FILE, save_model_file
from ssr_cli.seg.data import Sample, StreamLayout, TrainStream, clean_worker_error
from ssr_cli.seg.infer import validation_miou
from ssr_cli.seg.loss import LOSSES, segmentation_loss
from ssr_cli.seg.recipes import RECIPES
from ssr_cli.train import distributed as D
from ssr_cli.train.log import LOG_FILE, log_writer, peak_memory_mb, truncate_log
from ssr_cli.train.state import rng_states, save_checkpoint, set_rng_states, step_seed

OPTIMIZERS = ("sgd", "adamw")
_DEFAULT = RECIPES["deeplabv3plus"]


@dataclass
class TrainConfig:
    """Training settings. ``batch_size`` is per process; the effective batch is
    ``batch_size * accum * world``. Fields after ``seed`` do not change results."""

    iters: int = 20000
    batch_size: int = 10
    crop_size: int = 321
    accum: int = 1
    optimizer: str = "sgd"
    lr: float = _DEFAULT.lr
    momentum: float = _DEFAULT.momentum
    weight_decay: float = _DEFAULT.weight_decay
    poly_power: float = _DEFAULT.poly_power
    head_lr_mult: float = _DEFAULT.head_lr_mult
    head_bias_lr_mult: float = _DEFAULT.head_bias_lr_mult
    freeze_bn: bool = _DEFAULT.freeze_bn
    bias_decay: bool = _DEFAULT.bias_decay
    norm_decay: bool = _DEFAULT.norm_decay
    loss: str = "balanced"
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    precision: str = "fp32"
    sync_bn: bool = False
    seed: int = 0
    workers: int = 2
    save_every: int = 1000
    val_every: int = 1000
    log_every: int = 20
    check_sync_every: int = 0
    tensorboard: bool = False  # also TensorBoard event files in RUN/tensorboard/

    RESULT_FIELDS = (
        "iters",
        "batch_size",
        "crop_size",
        "accum",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "poly_power",
        "head_lr_mult",
        "head_bias_lr_mult",
        "freeze_bn",
        "bias_decay",
        "norm_decay",
        "loss",
        "scale_range",
        "flip",
        "precision",
        "sync_bn",
        "seed",
    )

    def __post_init__(self) -> None:
        checks = [
            (self.iters >= 1, "--iters must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.crop_size >= 16, "--crop-size must be at least 16"),
            (self.accum >= 1, "--accum must be at least 1"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.head_lr_mult > 0, "--head-lr-mult must be positive"),
            (self.head_bias_lr_mult > 0, "--head-bias-lr-mult must be positive"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (0 < self.scale_range[0] <= self.scale_range[1], "--scale-range must be 0 < min <= max"),
            (self.save_every >= 1, "--save-every must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale_range"] = list(self.scale_range)
        return data

    def result_dict(self) -> dict[str, Any]:
        data = self.to_dict()
        return {k: data[k] for k in self.RESULT_FIELDS}


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
    device = env.device
    torch.manual_seed(cfg.seed)  # the head's (and a random backbone's) initial weights follow --seed
    model: Any = build_segmenter(model_cfg, backbone_state)
    if cfg.freeze_bn:
        model.freeze_batchnorm()
    if cfg.sync_bn and env.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / cfg.iters) ** cfg.poly_power
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start = 0
    best: dict[str, Any] = {"miou": None, "iteration": None}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_states(resume["rng"])
        start, best = int(resume["iteration"]), dict(resume.get("best") or best)
    net: Any = model
    if env.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

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
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
        worker_init_fn=worker_guard(),
    )
    batches = iter(loader)
    log_path = out / LOG_FILE
    ckpt_dir = out / "checkpoints"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, start)
    images_per_step = cfg.batch_size * cfg.accum * env.world
    class_names = model_cfg.class_names or tuple(str(i) for i in range(model_cfg.num_classes))

    write_log, board = log_writer(out, log_path, env.is_main, cfg.tensorboard)

    def checkpoint_state(iteration: int) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_states(),
            "best": best,
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "fingerprint": run_fingerprint,
        }

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # throughput window since the last log line; validation and checkpoint time is left out
    window = {"steps": 0, "data": 0.0, "paused": 0.0, "start": time.perf_counter()}
    started = time.perf_counter()
    last_loss: float | None = None
    with (
        ProgressBar("fit-seg", total=cfg.iters, completed=start)
        if env.is_main
        else contextlib.nullcontext() as bar
    ):
        for it in range(start, cfg.iters):
            torch.manual_seed(step_seed(cfg.seed, it, env.rank))
            step_losses = []
            for micro in range(cfg.accum):
                t_data = time.perf_counter()
                try:
                    x, y = next(batches)
                except SSRError as exc:
                    raise clean_worker_error(exc) from None
                window["data"] += time.perf_counter() - t_data
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = net.no_sync() if env.enabled and micro < cfg.accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(device, cfg.precision):
                        logits = net(x)
                    loss = segmentation_loss(logits, y, cfg.loss)
                    scaler.scale(loss / cfg.accum).backward()
                step_losses.append(loss.detach())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step_loss = torch.stack(step_losses).double().mean()
            loss_sum += step_loss
            window["steps"] += 1
            done = it + 1
            if done - start == CPU_ESTIMATE_STEPS and device.type == "cpu" and env.is_main:
                _announce_cpu_time(time.perf_counter() - started, done - start, cfg.iters - done, cfg)

            if done % cfg.log_every == 0 or done == cfg.iters:
                reduced = D.all_reduce_sum(env, loss_sum.clone()) / env.world
                seconds = time.perf_counter() - window["start"] - window["paused"]
                last_loss = float(reduced) / window["steps"]
                speed = window["steps"] * images_per_step / max(seconds, 1e-9)
                record = {
                    "type": "train",
                    "iter": done,
                    "loss": last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": round(speed, 3),
                    "data_share": round(window["data"] / max(seconds, 1e-9), 4),
                    **peak_memory_mb(device),
                }
                write_log(record)
                status = f"loss {last_loss:.4f}  {speed:.2f} img/s"
                if bar is not None:
                    bar.update(advance=window["steps"], status=status)
                if env.is_main and not progress_enabled():
                    info(f"fit-seg: iteration {done}/{cfg.iters}  {status}")
                loss_sum.zero_()
                window.update(steps=0, data=0.0, paused=0.0, start=time.perf_counter())

            paused_from = time.perf_counter()
            if cfg.check_sync_every and done % cfg.check_sync_every == 0:
                D.check_ranks_agree(env, model, float(step_loss), done, write_log)

            if val_samples and (done == cfg.iters or (cfg.val_every and done % cfg.val_every == 0)):
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
                    class_names,
                    model_cfg.mean,
                    model_cfg.std,
                    env,
                    cfg.precision,
                    progress=val_status,
                )
                miou = result["miou"]
                improved = miou is not None and (best["miou"] is None or miou > best["miou"])
                if improved:
                    best = {"miou": miou, "iteration": done}
                write_log({"type": "val", "iter": done, "val_miou": miou, "best_miou": best["miou"]})
                if bar is not None:
                    bar.update(advance=0, status=f"validation mIoU {_pct(miou)}")
                if env.is_main:
                    info(f"fit-seg: iteration {done}: validation mIoU {_pct(miou)}")
                    if improved:
                        state = {
                            "iteration": done,
                            "model": model.state_dict(),
                            "miou": miou,
                            "model_config": model_cfg.to_dict(),
                            "fingerprint": run_fingerprint,
                        }
                        save_checkpoint(ckpt_dir / "best.pt", state)

            if done % cfg.save_every == 0 or done == cfg.iters:
                if env.is_main:
                    save_checkpoint(ckpt_dir / "last.pt", checkpoint_state(done))
                D.barrier(env)
            window["paused"] += time.perf_counter() - paused_from

    if board is not None:
        board.close()
    if env.is_main:
        save_model_file(out / MODEL_FILE, model.state_dict(), model_cfg)
    D.barrier(env)
    seconds = time.perf_counter() - started
    steps = cfg.iters - start
    return {
        "iterations": cfg.iters,
        "resumed_from": start,
        "final_loss": last_loss,
        "best": best,
        "seconds": round(seconds, 2),
        "images_per_s": round(steps * images_per_step / max(seconds, 1e-9), 3),
        **peak_memory_mb(device),
    }


def _pct(value: float | None) -> str:
    """A score (a fraction in JSON and logs) as a percentage for people: ``45.00 %``."""
    return "-" if value is None else f"{100 * value:.2f} %"


CPU_ESTIMATE_STEPS = 3  # steps timed before the one-time CPU estimate (the first includes warm-up)


def _announce_cpu_time(seconds: float, steps: int, remaining: int, cfg: Any) -> None:
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
