"""What the two loops that learn CMPA prototypes share (``train-cmpa``: ``cmpa/train.py``; ``ssr
train``: ``onestage/train.py``): the prompt embeddings of the vocabulary, the heads' optimizer
groups, and :class:`ProtoLoop`: prototype refreshes over the split, the step's seed, batch
prefetching, the CAM-weighted features through the heads with the prototype contrastive loss,
the optimizer update, the prototypes' EMA, the log window's sums and the end of the run.

Imports torch: import lazily.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
from ssr_cli.runtime import autocast
from ssr_cli.train import distributed as D
from ssr_cli.train.log import peak_memory_mb
from ssr_cli.train.loop import RunFiles, StepTimes, TrainLoop
from ssr_cli.train.state import rng_states, step_seed


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


@dataclass
class PromptSet:
    """A vocabulary's prompt embeddings on the device: per template (``fg_prompts`` [K, T, E],
    ``bg_prompts`` [B, T, E]), per class (``fg`` [K, E], ``bg`` [B, E]), and the class prompts
    flat (``flat`` [K*T, E]) with the class of each row (``txt_cls`` [K*T])."""

    fg_prompts: torch.Tensor
    bg_prompts: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    flat: torch.Tensor
    txt_cls: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(classes K, templates T)."""
        k, t_count = self.fg_prompts.shape[:2]
        return int(k), int(t_count)


def prompt_set(model: Any, vocab: Any, device: torch.device) -> PromptSet:
    fg_prompts, bg_prompts = (t.to(device) for t in prompt_embeddings(model, vocab))
    fg, bg = class_embeddings(fg_prompts), class_embeddings(bg_prompts)
    k, t_count = fg_prompts.shape[:2]
    flat = fg_prompts.reshape(k * t_count, -1)
    txt_cls = torch.arange(k, device=device).repeat_interleave(t_count)
    return PromptSet(fg_prompts, bg_prompts, fg, bg, flat, txt_cls)


def head_groups(heads: Any, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """The heads' AdamW groups: every parameter but the temperature with ``weight_decay``, the
    temperature without; ``extra`` (e.g. ``lr``) in both."""
    decay = [p for n, p in heads.named_parameters() if n != "log_inv_tau"]
    return [
        {"params": decay, "weight_decay": weight_decay, **extra},
        {"params": [heads.log_inv_tau], "weight_decay": 0.0, **extra},
    ]


def add_finite(window: torch.Tensor, at: int, value: torch.Tensor) -> None:
    """Add a finite ``value`` to the sum at ``window[at]`` and count it at ``window[at + 1]``."""
    if bool(torch.isfinite(value.detach())):
        window[at] += value.detach().double()
        window[at + 1] += 1


@dataclass
class ProtoStep:
    """The prototype half of a step: ``loss`` and its ``stats``; the image features ``feats`` of
    the (image, class) pairs (``ok``: those with a CAM); the live class text features ``live``;
    the heads' outputs ``projected`` and ``txt``; the rest of the network's outputs (``rest``)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    feats: torch.Tensor
    ok: torch.Tensor
    live: torch.Tensor
    projected: torch.Tensor
    txt: torch.Tensor
    rest: tuple[Any, ...]

    def touch(self) -> torch.Tensor:
        """A sum over the heads' outputs: added times 0 to the loss, every parameter is in the graph
        even without anchors (DistributedDataParallel needs it)."""
        return self.projected.float().sum() + self.txt.float().sum()


@dataclass
class ProtoParts:
    """What a prototype loop trains and reads: CLIP, the heads, the network that runs them (the
    heads or a module holding them, maybe in DistributedDataParallel), the split's items, the
    vocabulary's prompts, the batch loader, the optimizer and AMP scaler."""

    model: Any
    heads: Any
    net: torch.nn.Module
    items: list[TrainItem]
    prompts: PromptSet
    loader: Loader
    optimizer: torch.optim.Optimizer
    scaler: Any


class ProtoLoop(TrainLoop):
    """The loop of train-cmpa and ``ssr train`` (``name``: also the stage of the step seeds). A
    subclass defines the step and its log record, and what its checkpoints and summary hold beyond
    the heads'; ``window`` holds the log window's sums (float64), ``times`` the step time by part
    (with ``protos``: the refreshes)."""

    timed: tuple[str, ...] = ()  # the parts of a step, timed
    timed_apart: tuple[str, ...] = ("protos",)  # time spent outside the steps, by kind
    window_size = 1  # how many sums the log window holds

    def __init__(
        self,
        parts: ProtoParts,
        *,
        cfg: Any,
        env: D.DistEnv,
        files: RunFiles,
        start: int,
        sync_module: torch.nn.Module,
        resume: dict[str, Any] | None,
        fingerprint: str = "",
        clip_id: dict[str, Any] | None = None,
        val_samples: Sequence[Any] = (),
    ) -> None:
        """``fingerprint``, ``clip_id``: the run's, for its checkpoints."""
        super().__init__(env, cfg, files, start, sync_module, val_samples)
        self.fingerprint, self.clip_id = fingerprint, clip_id or {}
        self.parts = parts
        self.model, self.heads, self.net, self.items = parts.model, parts.heads, parts.net, parts.items
        self.prompts, self.loader = parts.prompts, parts.loader
        self.optimizer, self.scaler = parts.optimizer, parts.scaler
        self.precision = cfg.precision
        self.stream = SampleStream(len(parts.items), cfg.seed, cfg.batch_size, env.world)
        self.times = StepTimes(self.timed, extra=self.timed_apart)
        self.protos: Prototypes | None = None
        self.window = torch.zeros(self.window_size, dtype=torch.float64, device=env.device)
        self.last: dict[str, Any] = {}
        if resume is not None:
            self.protos = Prototypes.from_state_dict(resume["prototypes"], env.device)
            if env.is_main:  # the saved window is already summed over ranks
                self.window = resume["window"].to(device=env.device, dtype=torch.float64)

    def cams_through_heads(self) -> bool:
        """Whether the refresh's CAMs are taken through the heads (else plain CLIP's)."""
        return True

    def refresh(self, it: int) -> Prototypes:
        prompts = self.prompts
        found, seconds = refresh_prototypes(
            self.name,
            it,
            model=self.model,
            heads=self.heads,
            items=self.items,
            cfg=self.cfg,
            prompts=(prompts.fg_prompts, prompts.bg_prompts),
            cams=(prompts.fg, prompts.bg, self.cams_through_heads()),
            precision=self.precision,
            env=self.env,
            loader=self.loader,
            pick_seed=step_seed(self.cfg.seed, it, 0, self.name) % 2**31,
            bar=self.bar,
            write_log=self.write_log,
        )
        self.times.total["protos"] += seconds
        return found

    def begin_step(self, it: int) -> None:
        """Refresh the prototypes when due; seed torch for step ``it`` (this rank)."""
        if it % self.cfg.proto_every == 0 or self.protos is None:
            self.protos = self.refresh(it)
        torch.manual_seed(step_seed(self.cfg.seed, it, self.env.rank, self.name))

    def batch_of(self, it: int) -> tuple[list[int], int, list[Any]]:
        return step_batch(self.stream, self.cfg, it, self.env.rank, self.model.patch_size)

    def jobs(self, it: int) -> list[tuple[Path, int, Any]]:
        idx, side, augs = self.batch_of(it)
        return [(self.items[i].image, side, a) for i, a in zip(idx, augs, strict=True)]

    def prefetch(self, ahead: int) -> None:
        """More work to start for the later step ``ahead`` (default: none)."""

    def fetch(self, it: int) -> torch.Tensor:
        """Step ``it``'s augmented batch on the device; the next steps' are prepared meanwhile."""
        for ahead in range(it + 1, min(it + 1 + self.loader.ahead, self.cfg.iters)):
            self.loader.submit(("train", ahead), self.jobs(ahead))
            self.prefetch(ahead)
        return self.loader.get(("train", it), self.jobs(it)).to(self.env.device)

    def prototype_forward(
        self,
        patches: torch.Tensor,
        cams: torch.Tensor,
        img_idx: torch.Tensor,
        cls_idx: torch.Tensor,
        *extra: Any,
    ) -> ProtoStep:
        """The network on the CAM-weighted features (``pool`` tokens: ISA(CAM-weighted mean token),
        the CAM's ISA(mean token) form; projected: CAM-weighted mean of ISA(tokens)) and the
        prompts (``extra``: more inputs of the network), then the prototype loss."""
        cfg, device, flat = self.cfg, self.env.device, self.prompts.flat
        assert self.protos is not None  # begin_step refreshed them
        if cfg.pool == "tokens":
            pooled, ok = weighted_mean(cams, patches, img_idx)
            with autocast(device, self.precision):
                outs = self.net(pooled, flat, *extra)
            feats = F.normalize(outs[0].float(), dim=-1)
        else:
            with autocast(device, self.precision):
                outs = self.net(patches, flat, *extra)
            feats, ok = pool_features(cams, outs[0], img_idx)
        projected, txt, inv_tau = outs[:3]
        k, t_count = self.prompts.shape
        txt_feats = F.normalize(txt.float(), dim=-1)
        live = F.normalize(txt_feats.view(k, t_count, -1).mean(dim=1), dim=-1)
        loss, stats = prototype_loss(
            feats[ok],
            cls_idx[ok],
            txt_feats,
            self.prompts.txt_cls,
            self.protos,
            inv_tau.float(),
            text_live=live if cfg.text_target == "live" else None,
        )
        return ProtoStep(loss, stats, feats, ok, live, projected, txt, tuple(outs[3:]))

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (AMP-scaled)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def ema(self, step: ProtoStep, cls_idx: torch.Tensor) -> None:
        """With ``proto_ema`` > 0: move the prototypes towards this step's features."""
        if self.cfg.proto_ema > 0:
            assert self.protos is not None
            with torch.no_grad():
                bg_live = text_prototypes(self.heads.project_text, self.prompts.bg_prompts)
            ok = step.ok
            ema_update(
                self.protos,
                step.feats[ok],
                cls_idx[ok],
                step.live.detach(),
                bg_live,
                self.cfg.proto_ema,
                self.env,
            )

    def reduced_window(self) -> torch.Tensor:
        """The log window's sums over every rank (a collective: every rank calls it)."""
        return D.all_reduce_sum(self.env, self.window.clone())

    def speed(self) -> float:
        """Iterations per second in the log window."""
        return self.times.steps / max(self.times.seconds(), 1e-9)

    def report_window(self, done: int, record: dict[str, Any], status: str) -> None:
        """Log the window's record, then start a new window."""
        self.last = record
        self.report(done, record, status, self.times.steps)
        self.window.zero_()
        self.times.reset()

    def complete(self) -> tuple[Prototypes, dict[str, Any]]:
        """Every step, then (the prototypes, the run's summary); the log is closed."""
        self.run()
        protos, digests = self.finish()
        summary = self.summary(digests)
        self.files.close()
        return protos, summary

    def finish(self) -> tuple[Prototypes, list[str]]:
        """After the last step: the prototypes (with ``--iters 0``: the step-0 heads') and every
        rank's parameter digest."""
        if self.protos is None:
            self.protos = self.refresh(self.start)
        return self.protos, D.all_gather_object(self.env, D.parameter_digest(self.sync_module))

    def best_record(self) -> dict[str, Any]:
        """``{"best": the best validation}`` in the checkpoints and summary of a loop that
        validates; else nothing."""
        return {}

    def state_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(trained parts after the heads, schedules after the optimizer) in the checkpoints."""
        return {}, {}

    def checkpoint_state(self, done: int) -> dict[str, Any]:
        assert self.protos is not None
        parts, schedules = self.state_parts()
        return {
            "iteration": done,
            "heads": self.heads.state_dict(),
            "head_config": self.heads.cfg.to_dict(),
            **parts,
            "optimizer": self.optimizer.state_dict(),
            **schedules,
            "scaler": self.scaler.state_dict(),
            "prototypes": self.protos.state_dict(),
            "rng": rng_states(),
            "window": self.reduced_window().cpu(),
            **self.best_record(),
            "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
            "clip": self.clip_id,
        }

    def timing_summary(self, seconds: float) -> dict[str, Any]:
        """The summary's speed and time figures (``seconds``: the run's)."""
        raise NotImplementedError

    def summary(self, digests: list[str]) -> dict[str, Any]:
        """The run's summary for the manifest (``digests``: from :meth:`finish`)."""
        seconds = time.perf_counter() - self.started
        return {
            "iterations": self.cfg.iters,
            "resumed_from": self.start,
            "final": self.last,
            **self.best_record(),
            "temperature": self.heads.temperature,
            "seconds": round(seconds, 2),
            **self.timing_summary(seconds),
            "rank_digests": digests,
            **peak_memory_mb(self.env.device),
        }
