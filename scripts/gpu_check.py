#!/usr/bin/env python3
"""One command that checks every GPU code path of ssr-cli and measures the GPU figures.

Run it through ``scripts/gpu_check.sh`` (finds the Python, sets ``HF_HUB_OFFLINE=1``)::

    scripts/gpu_check.sh --out gpu-check                 # on a GPU machine (default --device cuda)
    scripts/gpu_check.sh --out /tmp/gc --device cpu --models tiny --images 16 ...   # the CPU proof

Each step is a function; the ssr commands run as subprocesses (``python -m ssr_cli ...``,
``python -m torch.distributed.run ...``) with a timeout taken from the script's own
``--time-limit``. A failing step is recorded (its error line and the end of its log) and the
steps that do not depend on it still run. After every step ``gpu_check.json`` and
``gpu_check.md`` are rewritten in ``--out``, so a run stopped at its time limit (or killed)
leaves what it measured; ``gpu_check.log`` holds every command and its output.

Steps (in this order, the most important first):

- ``environment``: torch / CUDA / cuDNN / NCCL versions, device name and memory, bf16 support,
  the packages ssr needs (an import failure there is reported at once).
- ``data``: the synthetic world (``ssr data synth``) and a VOC-sized set (synthetic images and
  masks resized to 500x375, so that make-seeds can batch them).
- ``seeds_fp32`` / ``seeds_bf16`` / ``seeds_fp16`` (fp16 on CUDA only: the CPU refuses it):
  make-seeds on VOC-sized images with ViT-B/16 (random weights); ``cam_compare``: per-map
  Pearson correlation, max |diff| and label agreement of bf16 and fp16 CAMs against fp32.
- ``seeds_throughput``: make-seeds images/s at each ``--batch-sizes`` (a warm-up run, then a
  timed run of the stage in one process) with peak GPU memory.
- ``refine_voc``: refine those seeds with DINO ViT-B/16 (random weights), CLIP attention from
  the seeds, SGC and CRF.
- ``tiny_*``: every stage on the synthetic world with the tiny trained models in
  ``examples/models``: train-cmpa, make-seeds --cmpa, refine, fit-seg with AMP (bf16, and fp16
  with the grad scaler on CUDA), predict, eval.
- ``torchrun_*``: train-cmpa and fit-seg under ``torchrun --nproc-per-node 1``; ``torchrun_ddp``:
  a process group with ssr's backend rule (nccl on CUDA, gloo on CPU), ssr's segmenter wrapped
  in DistributedDataParallel, AMP steps and the collectives ssr's distributed helpers use.
  (At WORLD_SIZE=1 ssr itself creates no process group: ``ssr_cli.train.distributed``.)

Exit status: 0 when every step succeeded, 1 otherwise (failed, skipped or out of time), 2 for
bad options. Internal sub-commands (``_env``, ``_seeds_bench``, ``_ddp``) are run by the script
itself in child processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"
TINY_CLIP = [
    "--clip-arch",
    str(MODELS / "ssr-tiny-clip.json"),
    "--clip-weights",
    str(MODELS / "tiny_clip.pt"),
]
TINY_DINO = [
    "--dino-model",
    str(MODELS / "ssr-tiny-dino.json"),
    "--dino-weights",
    str(MODELS / "tiny_dino.pth"),
]
VOC_HW = (375, 500)  # height, width of a typical VOC image
VOC_TRAIN_IMAGES = 1464
CLIP_ES_SPEEDUP_GOAL = 10.0  # x CLIP-ES's batch-1 throughput ~ 1,464 VOC train images in a minute
BF16_CORR_GOAL = 0.999
SCHEMA = 1
OOM = "out of GPU memory"


class StepFailed(Exception):
    """A step's own failure: one line for the report."""


class Interrupted(Exception):
    """SIGTERM / SIGINT: stop, record, write."""


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class Options:
    out: Path
    work: Path | None  # None: a new temporary folder (main)
    device: str
    time_limit: float
    models: str
    images: int
    voc_images: int
    compare_images: int
    batch_sizes: list[int]
    seg_iters: int
    cmpa_iters: int
    workers: int
    keep: bool
    refine_mask: str

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def precisions(self) -> list[str]:
        return ["fp32", "bf16", "fp16"] if self.cuda else ["fp32", "bf16"]

    @property
    def auto_precision(self) -> str:
        """What ``--precision auto`` resolves to for make-seeds on this device (runtime.py)."""
        return "bf16" if self.cuda else "fp32"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8,16")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Check every GPU path of ssr-cli and measure the GPU figures; writes "
        "gpu_check.json, gpu_check.md and gpu_check.log into --out.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json/.md/.log")
    p.add_argument(
        "--work", type=Path, help="folder for datasets and run folders (default: a new temporary one)"
    )
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole check (480)")
    p.add_argument(
        "--models",
        choices=("vitb16", "tiny"),
        default="vitb16",
        help="VOC-sized steps: CLIP ViT-B/16 + DINO ViT-B/16 with random weights (vitb16, default), "
        "or the tiny architectures of examples/models with random weights (tiny; fast CPU proof)",
    )
    p.add_argument("--images", type=_positive, help="synthetic-world images (cuda 120, cpu 24)")
    p.add_argument("--voc-images", type=_positive, help="VOC-sized images for throughput (cuda 512, cpu 8)")
    p.add_argument(
        "--compare-images", type=_positive, help="VOC-sized images for precisions (cuda 32, cpu 4)"
    )
    p.add_argument(
        "--batch-sizes", type=_int_list, help="make-seeds batch sizes (cuda 1,8,16,32,64; cpu 1,4)"
    )
    p.add_argument("--seg-iters", type=_positive, help="fit-seg iterations per precision (cuda 50, cpu 4)")
    p.add_argument("--cmpa-iters", type=_positive, help="train-cmpa iterations (cuda 40, cpu 4)")
    p.add_argument(
        "--workers",
        type=int,
        help="CPU worker processes for refine/fit-seg/predict (cuda 8, cpu 0: in-process)",
    )
    p.add_argument(
        "--refine-mask",
        choices=("auto", "sgc", "box"),
        default="auto",
        help="refine's column mask: sgc (needs OpenCV's contrib SLIC), box, or auto: sgc when "
        "cv2.ximgproc is there, else box (the GPU part of refine is the same)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (default: remove it)")
    a = p.parse_args(argv)
    device = a.device.strip().lower()
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        p.error(f"--device {a.device!r}: use cuda, cuda:N or cpu")
    if not a.time_limit > 0:
        p.error("--time-limit must be positive")
    cuda = device != "cpu"

    def pick(value: Any, gpu: Any, cpu: Any) -> Any:
        return value if value is not None else (gpu if cuda else cpu)

    compare = pick(a.compare_images, 32, 4)
    voc = pick(a.voc_images, 512, 8)
    return Options(
        out=a.out.resolve(),
        work=a.work.resolve() if a.work else None,
        device=device,
        time_limit=float(a.time_limit),
        models=a.models,
        images=pick(a.images, 120, 24),
        voc_images=max(voc, compare),
        compare_images=compare,
        batch_sizes=pick(a.batch_sizes, [1, 8, 16, 32, 64], [1, 4]),
        seg_iters=pick(a.seg_iters, 50, 4),
        cmpa_iters=pick(a.cmpa_iters, 40, 4),
        workers=max(0, pick(a.workers, min(8, os.cpu_count() or 1), 0)),
        keep=a.keep,
        refine_mask=a.refine_mask,
    )


# --------------------------------------------------------------------------------------------
# the run: steps, deadline, subprocesses, report


@dataclasses.dataclass
class Step:
    name: str
    what: str
    fn: Callable[[Check], dict[str, Any]]
    needs: tuple[str, ...] = ()
    cap_s: float = 120.0  # the most this step may take
    min_s: float = 5.0  # not started with less time left


class Check:
    def __init__(self, opts: Options, argv: list[str]) -> None:
        self.o = opts
        self.argv = argv
        self.t0 = time.monotonic()
        self.deadline = self.t0 + opts.time_limit
        self.started = dt.datetime.now(dt.timezone.utc)
        self.results: dict[str, dict[str, Any]] = {}
        self.env: dict[str, Any] = {}
        self.abort: str | None = None
        self.mask = "sgc"  # refine's --mask: sgc, or box where OpenCV's contrib SLIC is missing
        self.current: subprocess.Popen | None = None
        self.step_deadline = self.deadline
        self.python = sys.executable
        if opts.work is None:
            raise ValueError("Options.work must be set before the check starts")
        self.work: Path = opts.work
        self.data = self.work / "data"
        self.runs = self.work / "runs"
        self.log_path = opts.out / "gpu_check.log"

    # ---- time
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ---- subprocesses
    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # the check's own commands decide on torchrun
        env.update(extra or {})
        return env

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def run(self, cmd: list[str], *, timeout: float | None = None) -> str:
        """Run ``cmd`` (cwd: the repository); its output goes to the log. Returns stdout.

        Raises StepFailed with the command's last error line when it fails or runs past the
        step's time (its whole process group is killed then)."""
        left = self.step_deadline - time.monotonic()
        limit = left if timeout is None else min(timeout, left)
        if limit < 1:
            raise StepFailed("no time left for this command (time limit)")
        shown = " ".join(cmd).replace(self.python, "python")
        self.log(f"\n$ {shown}\n")
        out_path = self.work / "stdout.tmp"
        log_start = self.log_path.stat().st_size
        with (
            out_path.open("w+", encoding="utf-8", errors="replace") as out,
            self.log_path.open("a", encoding="utf-8", errors="replace") as err,
        ):
            # its own process group (not session), so that a timeout kills everything it started
            group: dict[str, Any] = (
                {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            )
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.child_env(), stdout=out, stderr=err, **group)
            self.current = proc
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise StepFailed(f"timed out after {limit:.0f} s: {shown[:200]}") from None
            except BaseException:
                self._kill(proc)
                raise
            finally:
                self.current = None
            out.seek(0)
            stdout = out.read()
        out_path.unlink(missing_ok=True)
        error = self._last_error(log_start) if proc.returncode != 0 else ""
        if stdout:
            self.log(stdout[-4000:])
        if proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: {error}")
        return stdout

    def _last_error(self, offset: int) -> str:
        """The command's error line from its stderr (in the log after ``offset``): ssr's
        one-line ``error:``, else the last line (a traceback's exception)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                lines = fh.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        lines = [line.strip() for line in lines if line.strip() and not line.startswith("$ ")]
        for line in reversed(lines):
            if "error:" in line.lower():
                return line[:400]
        return lines[-1][:400] if lines else "(no output)"

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and every process it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def ssr(self, *args: str, timeout: float | None = None) -> str:
        return self.run([self.python, "-m", "ssr_cli", *args], timeout=timeout)

    def torchrun(self, *args: str) -> str:
        launcher = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        return self.run([*launcher, *args])

    # ---- steps
    def run_steps(self, steps: list[Step]) -> None:
        for step in steps:
            record: dict[str, Any] = {"name": step.name, "what": step.what, "status": "skipped"}
            self.results[step.name] = record
            missing = [n for n in step.needs if self.results.get(n, {}).get("status") != "ok"]
            if self.abort:
                record["error"] = self.abort
            elif self.remaining() < step.min_s:
                record["error"] = (
                    f"time limit: {self.remaining():.0f} s left, the step needs {step.min_s:.0f}"
                )
            elif missing:
                record["error"] = f"needs {', '.join(missing)}"
            else:
                self._run_step(step, record)
            self.write()

    def _run_step(self, step: Step, record: dict[str, Any]) -> None:
        self.step_deadline = min(self.deadline - 3.0, time.monotonic() + step.cap_s)
        self.log(f"\n===== step {step.name}: {step.what} ({self.elapsed():.0f} s elapsed)")
        record["status"] = "running"
        self.write()
        start = time.monotonic()
        try:
            figures = step.fn(self)
            record.update(status="ok", figures=figures)
        except StepFailed as exc:
            record.update(status="failed", error=str(exc))
        except Interrupted:
            record.update(status="interrupted", error="stopped by a signal")
            record["seconds"] = round(time.monotonic() - start, 2)
            raise
        except Exception as exc:  # a bug in the check itself: recorded, the rest still runs
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:400])
        record["seconds"] = round(time.monotonic() - start, 2)
        self.log(f"===== {step.name}: {record['status']} in {record['seconds']} s {record.get('error', '')}")

    # ---- report
    def summary(self) -> dict[str, Any]:
        return summarise(self)

    def write(self) -> None:
        self.o.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "schema": SCHEMA,
            "tool": "scripts/gpu_check.py",
            "command": "scripts/gpu_check.sh " + " ".join(self.argv),
            "device": self.o.device,
            "models": self.o.models,
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.o).items()
            },
            "started": self.started.isoformat(timespec="seconds"),
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed(), 1),
            "time_limit_s": self.o.time_limit,
            "environment": self.env,
            "steps": list(self.results.values()),
        }
        doc["all_ok"] = bool(self.results) and all(r["status"] == "ok" for r in self.results.values())
        doc["summary"] = self.summary()
        _write_atomic(self.o.out / "gpu_check.json", json.dumps(doc, indent=2, default=str) + "\n")
        _write_atomic(self.o.out / "gpu_check.md", markdown(doc))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# steps


# fmt: off


def clip_big(o: Options) -> list[str]:
    arch = str(MODELS / "ssr-tiny-clip.json") if o.models == "tiny" else "ViT-B-16"
    return ["--clip-arch", arch, "--clip-weights", "random"]


def dino_big(o: Options) -> list[str]:
    model = str(MODELS / "ssr-tiny-dino.json") if o.models == "tiny" else "dino_vitb16"
    return ["--dino-model", model, "--dino-weights", "random"]


def step_environment(c: Check) -> dict[str, Any]:
    path = c.work / "environment.json"
    c.run([c.python, __file__, "_env", "--device", c.o.device, "--result", str(path)], timeout=120)
    env = json.loads(path.read_text())
    c.env = env
    if env.get("missing_packages"):
        c.abort = "missing packages: " + ", ".join(env["missing_packages"])
        raise StepFailed(c.abort)
    if c.o.refine_mask == "sgc" and not env.get("slic_available"):
        c.abort = "--refine-mask sgc: cv2.ximgproc (opencv-contrib-python-headless) is missing"
        raise StepFailed(c.abort)
    if c.o.refine_mask == "auto":
        c.mask = "sgc" if env.get("slic_available") else "box"
    else:
        c.mask = c.o.refine_mask
    if c.o.cuda and not env.get("cuda_available"):
        c.abort = "no CUDA device visible to torch"
        raise StepFailed(c.abort)
    figures = {k: env.get(k) for k in ("torch", "cuda", "device_name", "bf16_supported")}
    figures["refine_mask"] = c.mask
    return figures


def flags(text: str) -> list[str]:
    """``"--iters 4 --dim 64"`` -> its words (for flags and values without spaces; paths go apart)."""
    return text.split()


def step_data(c: Check) -> dict[str, Any]:
    from PIL import Image

    o = c.o
    world, voc = c.data / "world", c.data / "voc"
    jobs = min(8, os.cpu_count() or 1)
    c.ssr("data", "synth", "--out", str(world), *flags(f"--images {o.images} --seed 0"),
          *flags(f"--val-fraction 0.25 --workers {jobs} --overwrite"))
    c.ssr("data", "synth", "--out", str(voc), *flags(f"--images {o.voc_images} --seed 1"),
          *flags(f"--size-range 300,500 --val-fraction 0 --workers {jobs} --overwrite"))
    h, w = VOC_HW
    ids = []
    for line in (voc / "labels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            ids.append(line.split()[0])
    for item in ids:  # every image the same size, so that make-seeds batches them
        image = next((voc / "images").glob(f"{item}.*"))
        with Image.open(image) as im:
            resized = im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        resized.save(image, quality=92)
        mask = voc / "masks" / f"{item}.png"
        with Image.open(mask) as m:
            resized = m.resize((w, h), Image.Resampling.NEAREST)  # keeps the palette and its indices
        resized.save(mask)
    splits = voc / "splits"
    splits.mkdir(exist_ok=True)
    (splits / "bench.txt").write_text("\n".join(ids) + "\n")
    (splits / "compare.txt").write_text("\n".join(ids[: o.compare_images]) + "\n")
    n_compare = min(o.compare_images, len(ids))
    return {"world_images": o.images, "voc_images": len(ids), "voc_size": f"{w}x{h}",
            "compare_images": n_compare}


def make_seeds_step(precision: str) -> Callable[[Check], dict[str, Any]]:
    def fn(c: Check) -> dict[str, Any]:
        o = c.o
        out = c.runs / f"voc-seeds-{precision}"
        bs = min(8, max(o.batch_sizes))
        c.ssr("make-seeds", "--data", str(c.data / "voc"), "--split", "compare", "--out", str(out),
              *clip_big(o), *flags(f"--precision {precision} --batch-size {bs} --device {o.device}"),
              *flags("--workers 2 --overwrite"))
        return manifest_figures(out)

    return fn


def manifest_figures(run: Path) -> dict[str, Any]:
    """Completion, items and the stage's own timing (item loop when recorded) from a manifest."""
    m = json.loads((run / "manifest.json").read_text())
    if not m.get("completed"):
        raise StepFailed(
            f"{run}: the run is not complete ({m.get('items_done')} of {m.get('item_count')} items)"
        )
    runs = m.get("timing", {}).get("runs", [])
    seconds = sum(r.get("loop_seconds", r.get("seconds", 0.0)) for r in runs)
    items = sum(int(r.get("items", 0)) for r in runs)
    figures: dict[str, Any] = {"items": m.get("items_done")}
    if seconds > 0 and items:
        figures["seconds"] = round(seconds, 3)
        figures["images_per_s"] = round(items / seconds, 3)
    return figures


def cam_agreement(ref: Path, other: Path) -> dict[str, Any]:
    """Per-map Pearson correlation, max |diff| and label agreement of two seeds runs."""
    import numpy as np

    from ssr_cli.artefacts.seeds import load_seed
    from ssr_cli.cam.labels import cams_to_labels, upsample_cams
    from ssr_cli.errors import ArtefactError

    corr: list[float] = []
    constant = nonfinite = 0
    malformed: list[str] = []
    maxdiff = 0.0
    agree: list[float] = []
    files = sorted((ref / "cams").glob("*.npz"))
    if not files:
        raise StepFailed(f"no CAMs in {ref}")
    for fa in files:
        a = load_seed(fa, with_attn=False)
        try:  # load_seed refuses non-finite CAMs: a finding about that precision, counted
            b = load_seed(other / "cams" / fa.name, with_attn=False)
        except ArtefactError as exc:
            malformed.append(str(exc))
            continue
        ca, cb = a["cams"].astype(np.float64), b["cams"].astype(np.float64)
        if ca.shape != cb.shape or list(a["class_ids"]) != list(b["class_ids"]):
            raise StepFailed(f"{fa.name}: CAM shapes or classes differ ({ca.shape} vs {cb.shape})")
        for m, n in zip(ca, cb, strict=True):
            if not (np.isfinite(m).all() and np.isfinite(n).all()):
                nonfinite += 1  # NaN/inf in a map (fp16 overflow, say): counted, reported
                continue
            if m.std() == 0 or n.std() == 0:
                constant += 1  # a flat map has no correlation; counted, not averaged
                continue
            corr.append(float(np.corrcoef(m.ravel(), n.ravel())[0, 1]))
        if ca.size and np.isfinite(ca).all() and np.isfinite(cb).all():
            maxdiff = max(maxdiff, float(np.abs(ca - cb).max()))
        hw = (int(a["image_hw"][0]), int(a["image_hw"][1]))
        ids = [int(i) for i in a["class_ids"]]
        la = cams_to_labels(upsample_cams(ca.astype(np.float32), hw), ids)
        lb = cams_to_labels(upsample_cams(cb.astype(np.float32), hw), ids)
        agree.append(float((la == lb).mean()))
    if not corr:
        raise StepFailed(f"no CAM pair to correlate ({len(malformed)} malformed: {malformed[:1]})")
    return {
        "images": len(files),
        "malformed_files": len(malformed),
        "first_malformed": malformed[0] if malformed else None,
        "maps": len(corr),
        "constant_maps": constant,
        "nonfinite_maps": nonfinite,
        "pearson_mean": float(np.mean(corr)),
        "pearson_min": float(np.min(corr)),
        "max_abs_diff": maxdiff,
        "label_agreement_mean": float(np.mean(agree)),
        "label_agreement_min": float(np.min(agree)),
    }


def step_cam_compare(c: Check) -> dict[str, Any]:
    ref = c.runs / "voc-seeds-fp32"
    out: dict[str, Any] = {}
    errors = []
    for p in c.o.precisions[1:]:
        other = c.runs / f"voc-seeds-{p}"
        if c.results.get(f"seeds_{p}", {}).get("status") != "ok":
            errors.append(f"{p}: its seeds step did not succeed")
            continue
        out[f"{p}_vs_fp32"] = cam_agreement(ref, other)
        if out[f"{p}_vs_fp32"]["malformed_files"]:
            errors.append(f"{p}: {out[f'{p}_vs_fp32']['malformed_files']} seed file(s) refused by load_seed")
    if errors:
        c.results["cam_compare"]["figures"] = out  # keep what was measured
        raise StepFailed("; ".join(errors))
    return out


def step_throughput(c: Check) -> dict[str, Any]:
    o = c.o
    result = c.work / "seeds_bench.jsonl"
    result.unlink(missing_ok=True)
    cmd = [c.python, __file__, "_seeds_bench", "--data", str(c.data / "voc"), "--split", "bench",
           "--out", str(c.runs / "bench"), "--arch", clip_big(o)[1], "--result", str(result),
           *flags(f"--device {o.device} --batch-sizes {','.join(map(str, o.batch_sizes))}"),
           *flags(f"--workers 4 --deadline-in {c.step_deadline - time.monotonic() - 5:.0f}")]
    error = None
    try:
        c.run(cmd)
    except StepFailed as exc:
        error = str(exc)
    rows = [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []
    ok = [r for r in rows if "images_per_s" in r]
    figures: dict[str, Any] = {"precision": o.auto_precision, "images": o.voc_images, "runs": rows}
    if ok:
        b1 = next((r for r in ok if r["batch_size"] == 1), None)
        best = max(ok, key=lambda r: r["images_per_s"])
        figures.update(
            best_batch_size=best["batch_size"],
            best_images_per_s=best["images_per_s"],
            best_peak_gpu_mb=best.get("peak_gpu_mb"),
            seconds_for_1464_voc_train=round(VOC_TRAIN_IMAGES / best["images_per_s"], 1),
        )
        if b1:
            figures["batch1_images_per_s"] = b1["images_per_s"]
            figures["best_vs_batch1"] = round(best["images_per_s"] / b1["images_per_s"], 2)
    oom = [r["batch_size"] for r in rows if r.get("error") == OOM]
    figures["out_of_memory_at"] = oom[0] if oom else None  # a finding, not a failure
    bad = [f"batch {r['batch_size']}: {r['error']}" for r in rows if r.get("error", OOM) != OOM]
    if error or not ok or bad:
        c.results["seeds_throughput"]["figures"] = figures  # keep what was measured
        raise StepFailed("; ".join([e for e in [error, *bad] if e]) or "no batch size was measured")
    return figures


def step_refine_voc(c: Check) -> dict[str, Any]:
    o = c.o
    seeds = c.runs / f"voc-seeds-{o.auto_precision}"
    out = c.runs / "voc-refine"
    c.ssr("refine", "--seeds", str(seeds), "--out", str(out), *dino_big(o), "--mask", c.mask,
          *flags(f"--device {o.device} --workers {o.workers} --overwrite"))
    return {**manifest_figures(out), "mask": c.mask}


def _tiny_cmpa_args(c: Check, out: Path, iters: int) -> list[str]:
    """train-cmpa in bf16 on every device: the GPU default, so that the CPU proof runs the same
    dtype path (the first GPU run failed in it: a bf16/fp32 mix the fp32 CPU run never met)."""
    bs = 16 if c.o.cuda else 8
    return ["train-cmpa", "--data", str(c.data / "world"), "--split", "train", "--out", str(out), *TINY_CLIP,
            *flags(f"--iters {iters} --batch-size {bs} --size 160 --proto-every {max(1, iters // 2)}"),
            *flags(f"--dim 64 --save-every {iters} --device {c.o.device} --precision bf16 --overwrite")]


def last_log(run: Path, key: str) -> dict[str, Any]:
    """The last record of ``run/log.jsonl`` that has ``key``."""
    found: dict[str, Any] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if key in rec:
                found = rec
    if not found:
        raise StepFailed(f"{run / 'log.jsonl'} has no record with {key!r}")
    return found


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def step_tiny_cmpa(c: Check) -> dict[str, Any]:
    out = c.runs / "cmpa"
    c.ssr(*_tiny_cmpa_args(c, out, c.o.cmpa_iters))
    rec = last_log(out, "loss")
    if not finite(rec["loss"]):
        raise StepFailed(f"train-cmpa loss is not finite: {rec['loss']}")
    return {"iterations": rec.get("iter"), "loss": rec["loss"]}


def step_tiny_seeds(c: Check) -> dict[str, Any]:
    out = c.runs / "seeds"
    c.ssr("make-seeds", "--data", str(c.data / "world"), "--split", "train", "--out", str(out), *TINY_CLIP,
          "--cmpa", str(c.runs / "cmpa"), *flags(f"--batch-size 8 --device {c.o.device} --overwrite"))
    return manifest_figures(out)


def step_tiny_refine(c: Check) -> dict[str, Any]:
    out = c.runs / "refine"
    c.ssr("refine", "--seeds", str(c.runs / "seeds"), "--out", str(out), *TINY_DINO,
          "--mask", c.mask, *flags(f"--device {c.o.device} --workers {c.o.workers} --overwrite"))
    return {**manifest_figures(out), "mask": c.mask}


def _fit_seg_args(c: Check, out: Path, precision: str, iters: int) -> list[str]:
    crop, bs = (160, 8) if c.o.cuda else (96, 4)
    return ["fit-seg", "--data", str(c.data / "world"), "--split", "train",
            "--pseudo", str(c.runs / "refine"), "--out", str(out),
            *flags("--backbone resnet18 --no-pretrained --optimizer adamw --lr 1e-3"),
            *flags(f"--head-lr-mult 1 --iters {iters} --batch-size {bs} --crop-size {crop} --val-split val"),
            *flags(f"--val-every 0 --save-every {iters} --log-every {iters} --precision {precision}"),
            *flags(f"--device {c.o.device} --workers {min(2, c.o.workers)} --overwrite")]


def fit_seg_figures(out: Path) -> dict[str, Any]:
    rec = last_log(out, "loss")
    val = last_log(out, "val_miou")
    if not finite(rec["loss"]):
        raise StepFailed(f"fit-seg loss is not finite: {rec['loss']}")
    figures = {
        "iterations": rec.get("iter"),
        "loss": rec["loss"],
        "images_per_s": rec.get("images_per_s"),
        "peak_gpu_mb": rec.get("max_gpu_mb"),
        "val_miou": val.get("val_miou"),
    }
    return figures


def fit_seg_step(precision: str) -> Callable[[Check], dict[str, Any]]:
    def fn(c: Check) -> dict[str, Any]:
        out = c.runs / f"seg-{precision}"
        c.ssr(*_fit_seg_args(c, out, precision, c.o.seg_iters))
        figures = fit_seg_figures(out)
        figures["grad_scaler_scale"] = grad_scaler_scale(out)
        if precision == "fp16" and not finite(figures["grad_scaler_scale"]):
            raise StepFailed(f"fp16 run without an active grad scaler: {figures['grad_scaler_scale']}")
        return figures

    return fn


def grad_scaler_scale(run: Path) -> float | None:
    """The AMP grad scaler's scale in the run's last checkpoint (None when the scaler was off)."""
    from ssr_cli.seg.checkpoint import load_checkpoint_file as load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt").get("scaler") or {}
    scale = state.get("scale")
    return None if scale is None else float(scale)


def step_tiny_predict(c: Check) -> dict[str, Any]:
    out = c.runs / "pred"
    model = c.runs / f"seg-{c.o.precisions[1]}"  # the bf16 one
    c.ssr("predict", "--model", str(model), "--data", str(c.data / "world"), "--split", "val",
          "--out", str(out), *flags(f"--scales 0.75,1.0 --flip --device {c.o.device}"),
          *flags(f"--workers {min(2, c.o.workers)} --overwrite"))
    return manifest_figures(out)


def step_tiny_eval(c: Check) -> dict[str, Any]:
    world = str(c.data / "world")
    figures = {}
    for name, run, split, extra in (
        ("seeds_miou", "seeds", "train", ["--search-bg"]),
        ("refine_miou", "refine", "train", []),
        ("predict_miou", "pred", "val", []),
    ):
        text = c.ssr("--quiet", "eval", str(c.runs / run), "--data", world, "--split", split,
                     "--json", *extra, "--out", str(c.work / f"eval-{run}"))
        miou = json.loads(text)["summary"]["miou"]
        if not finite(miou):
            raise StepFailed(f"eval of {run}: mIoU {miou}")
        figures[name] = round(float(miou), 4)
    return figures


def step_torchrun_cmpa(c: Check) -> dict[str, Any]:
    out = c.runs / "cmpa-torchrun"
    c.torchrun("-m", "ssr_cli", *_tiny_cmpa_args(c, out, max(2, c.o.cmpa_iters // 4)))
    rec = last_log(out, "loss")
    if not finite(rec["loss"]):
        raise StepFailed(f"train-cmpa loss is not finite: {rec['loss']}")
    return {"iterations": rec.get("iter"), "loss": rec["loss"], "process_group": "none at WORLD_SIZE=1"}


def step_torchrun_seg(c: Check) -> dict[str, Any]:
    out = c.runs / "seg-torchrun"
    args = _fit_seg_args(c, out, "auto", max(2, c.o.seg_iters // 5))
    c.torchrun("-m", "ssr_cli", *args)
    figures = fit_seg_figures(out)
    figures["process_group"] = "none at WORLD_SIZE=1"
    return figures


def step_torchrun_ddp(c: Check) -> dict[str, Any]:
    result = c.work / "ddp.json"
    result.unlink(missing_ok=True)
    c.torchrun(__file__, "_ddp", "--device", c.o.device, "--result", str(result))
    figures = json.loads(result.read_text())
    if not finite(figures.get("loss")):
        raise StepFailed(f"DDP loss is not finite: {figures.get('loss')}")
    return figures


# fmt: on


def build_steps(o: Options) -> list[Step]:
    seeds = [
        Step(
            f"seeds_{p}",
            f"make-seeds {p} on VOC-sized images ({o.models})",
            make_seeds_step(p),
            ("data",),
            150,
            20,
        )
        for p in o.precisions
    ]
    tiny_fit = [
        Step(
            f"tiny_fit_seg_{p}",
            f"fit-seg {o.seg_iters} iterations, precision {p}" + (" (grad scaler)" if p == "fp16" else ""),
            fit_seg_step(p),
            ("tiny_refine",),
            150,
            20,
        )
        for p in o.precisions[1:]
    ]
    return [
        Step("environment", "versions, device, bf16 support, packages", step_environment, (), 120, 5),
        Step("data", "synthetic world + VOC-sized set (500x375)", step_data, ("environment",), 180, 10),
        *seeds,
        Step("cam_compare", "CAMs of bf16/fp16 against fp32", step_cam_compare, ("seeds_fp32",), 120, 5),
        Step(
            "seeds_throughput",
            "make-seeds images/s per batch size, peak GPU memory",
            step_throughput,
            ("data",),
            240,
            30,
        ),
        Step(
            "refine_voc",
            f"refine VOC-sized seeds with DINO ({o.models}), SGC, CRF",
            step_refine_voc,
            (f"seeds_{o.auto_precision}",),
            150,
            20,
        ),
        Step(
            "tiny_train_cmpa",
            f"train-cmpa {o.cmpa_iters} iterations (tiny CLIP)",
            step_tiny_cmpa,
            ("data",),
            150,
            20,
        ),
        Step(
            "tiny_make_seeds", "make-seeds --cmpa (tiny CLIP)", step_tiny_seeds, ("tiny_train_cmpa",), 120, 15
        ),
        Step("tiny_refine", "refine (tiny DINO), SGC, CRF", step_tiny_refine, ("tiny_make_seeds",), 150, 15),
        *tiny_fit,
        Step("tiny_predict", "predict, 2 scales + flip", step_tiny_predict, (tiny_fit[0].name,), 120, 15),
        Step("tiny_eval", "eval seeds, refine, predict", step_tiny_eval, ("tiny_predict",), 90, 10),
        Step(
            "torchrun_train_cmpa",
            "train-cmpa under torchrun --nproc-per-node 1",
            step_torchrun_cmpa,
            ("data",),
            150,
            20,
        ),
        Step(
            "torchrun_fit_seg",
            "fit-seg under torchrun --nproc-per-node 1",
            step_torchrun_seg,
            ("tiny_refine",),
            150,
            20,
        ),
        Step(
            "torchrun_ddp",
            "process group (nccl on CUDA) + DDP segmenter AMP steps + collectives",
            step_torchrun_ddp,
            ("environment",),
            120,
            20,
        ),
    ]


# --------------------------------------------------------------------------------------------
# summary and markdown


def _fig(c: Check, step: str) -> dict[str, Any]:
    return c.results.get(step, {}).get("figures") or {}


def summarise(c: Check) -> dict[str, Any]:
    thr = _fig(c, "seeds_throughput")
    cmp = _fig(c, "cam_compare")
    s: dict[str, Any] = {
        "make_seeds": {
            k: thr.get(k)
            for k in (
                "precision",
                "batch1_images_per_s",
                "best_batch_size",
                "best_images_per_s",
                "best_vs_batch1",
                "best_peak_gpu_mb",
                "seconds_for_1464_voc_train",
            )
        }
    }
    s["cams"] = cmp
    s["fit_seg"] = {p: _fig(c, f"tiny_fit_seg_{p}") for p in c.o.precisions[1:]}
    goals: dict[str, Any] = {}
    best = thr.get("best_images_per_s")
    goals["make_seeds_1464_in_60s"] = {
        "goal": f"1,464 VOC train images in under 60 s (>= {VOC_TRAIN_IMAGES / 60:.1f} images/s), i.e. "
        f"{CLIP_ES_SPEEDUP_GOAL:.0f}x CLIP-ES's batch-1 throughput as the issue estimates it",
        "measured": best,
        "met": None if best is None else bool(best >= VOC_TRAIN_IMAGES / 60),
    }
    goals["make_seeds_best_vs_batch1"] = {
        "goal": "our best batch vs our batch 1 (reported beside the absolute figure; CLIP-ES itself "
        "was not run here)",
        "measured": thr.get("best_vs_batch1"),
        "met": None,
    }
    bf16 = cmp.get("bf16_vs_fp32", {})
    goals["bf16_cam_correlation"] = {
        "goal": f"bf16 CAMs correlate >= {BF16_CORR_GOAL} with fp32 (per-map Pearson, mean; min shown)",
        "measured": bf16.get("pearson_mean"),
        "min": bf16.get("pearson_min"),
        "met": None if bf16.get("pearson_mean") is None else bool(bf16["pearson_mean"] >= BF16_CORR_GOAL),
    }
    if not c.o.cuda:  # the goals are GPU goals: shown, not judged, on the CPU
        for goal in goals.values():
            goal["met"] = None
            goal["note"] = "GPU goal: not judged on the CPU"
    s["goals"] = goals
    return s


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    s = doc["summary"]
    lines = [
        f"# ssr-cli GPU check ({doc['device']}, models {doc['models']})",
        "",
        f"`{doc['command']}` — started {doc['started']}, {doc['elapsed_s']} s of "
        f"{doc['time_limit_s']:.0f} s; "
        f"all steps ok: **{_fmt(doc['all_ok'])}**",
        "",
        f"Environment: torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
        f"cuDNN {env.get('cudnn', '-')}, "
        f"NCCL {env.get('nccl', '-')}, device {env.get('device_name', '?')} "
        f"({_fmt(env.get('device_memory_gb'), 1)} GB), bf16 supported: {_fmt(env.get('bf16_supported'))}, "
        f"Python {env.get('python', '?')}, open_clip {env.get('packages', {}).get('open_clip_torch', '?')}, "
        f"timm {env.get('packages', {}).get('timm', '?')}",
        "",
        "| step | status | s | figures / error |",
        "|---|---|---|---|",
    ]
    for r in doc["steps"]:
        figs = r.get("figures") or {}
        parts = [f"{k} {_fmt(v)}" for k, v in figs.items() if not isinstance(v, dict | list)]
        for k, v in figs.items():  # the CAM comparisons: their headline figures
            if isinstance(v, dict):
                parts += [
                    f"{k}.{sub} {_fmt(v[sub], 5)}" for sub in ("pearson_mean", "pearson_min") if sub in v
                ]
        text = ", ".join(parts)
        if r.get("error"):
            text = (text + "; " if text else "") + "**" + r["error"].replace("|", "/") + "**"
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('seconds'), 1)} | {text} |")
    thr = next((r.get("figures") or {} for r in doc["steps"] if r["name"] == "seeds_throughput"), {})
    if thr.get("runs"):
        lines += [
            "",
            f"make-seeds throughput ({thr.get('images')} images, precision {thr.get('precision')}):",
            "",
            "| batch | images/s | peak GPU MiB | loop s |",
            "|---|---|---|---|",
        ]
        for r in thr["runs"]:
            if "error" in r:
                lines.append(f"| {r['batch_size']} | **{r['error']}** | | |")
            else:
                lines.append(
                    f"| {r['batch_size']} | {_fmt(r['images_per_s'], 2)} | "
                    f"{_fmt(r.get('peak_gpu_mb'), 0)} | {_fmt(r.get('loop_s'), 2)} |"
                )
    cams = s.get("cams") or {}
    if cams:
        lines += [
            "",
            "| CAMs vs fp32 | Pearson mean | Pearson min | max abs diff | label agreement mean/min |",
            "|---|---|---|---|---|",
        ]
        for name, v in cams.items():
            lines.append(
                f"| {name.split('_')[0]} | {_fmt(v.get('pearson_mean'), 5)} | {_fmt(v.get('pearson_min'), 5)}"
                f" | {_fmt(v.get('max_abs_diff'), 4)} | {_fmt(v.get('label_agreement_mean'), 4)} / "
                f"{_fmt(v.get('label_agreement_min'), 4)} |"
            )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in s["goals"].values():
        extra = f" (min {_fmt(g['min'], 5)})" if g.get("min") is not None else ""
        lines.append(f"| {g['goal']} | {_fmt(g['measured'], 4)}{extra} | {_fmt(g['met'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# child modes (run by the check in their own processes)


def child_env_facts(argv: list[str]) -> None:
    """``_env --device D --result FILE``: versions, device facts and the packages ssr imports."""
    p = argparse.ArgumentParser(prog="gpu_check.py _env")
    p.add_argument("--device", required=True)
    p.add_argument("--result", type=Path, required=True)
    a = p.parse_args(argv)
    import importlib
    import importlib.metadata
    import platform

    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
    }
    try:
        nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
        facts["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    except Exception as exc:
        facts["nccl"] = f"unavailable ({type(exc).__name__})"
    if a.device != "cpu" and torch.cuda.is_available():
        index = int(a.device[5:]) if ":" in a.device else 0
        props = torch.cuda.get_device_properties(index)
        facts.update(
            device_name=props.name,
            device_memory_gb=round(props.total_memory / 1e9, 1),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            gpu_count=torch.cuda.device_count(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            facts["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            facts["driver"] = None
    else:
        facts.update(device_name=f"CPU ({platform.processor() or platform.machine()})", bf16_supported=None)
    packages: dict[str, str] = {}
    missing = []
    modules = {  # distribution -> module ssr imports
        "open_clip_torch": "open_clip", "timm": "timm", "torchvision": "torchvision", "numpy": "numpy",
        "opencv-contrib-python-headless": "cv2", "pydensecrf2": "pydensecrf.densecrf",
        "scikit-learn": "sklearn", "typer": "typer", "rich": "rich", "safetensors": "safetensors",
        "pillow": "PIL", "ftfy": "ftfy",
    }  # fmt: skip
    for dist, module in modules.items():
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{dist} ({type(exc).__name__}: {exc})"[:200])
            continue
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = "installed (other distribution)"
    try:
        import cv2

        cv2.ximgproc.createSuperpixelSLIC  # noqa: B018  (SLIC is in opencv-contrib only)
        facts["slic_available"] = True
    except Exception:
        facts["slic_available"] = False  # refine then runs with --mask box (see Check.refine_mask)
    facts["packages"] = packages
    facts["missing_packages"] = missing
    import ssr_cli

    facts["ssr_cli"] = ssr_cli.__version__
    a.result.write_text(json.dumps(facts, indent=2))


def child_seeds_bench(argv: list[str]) -> None:
    """``_seeds_bench``: make-seeds throughput per batch size, in this process.

    For each batch size: a warm-up run of the stage on the first 2 batches (kernels, caches),
    then the timed run over the whole split into a fresh folder; images/s = images / the
    stage's own item-loop time (model set-up and text embeddings excluded), peak GPU memory
    from ``torch.cuda.max_memory_allocated`` reset before the timed run. One JSON line per
    batch size is appended to ``--result`` as soon as it is measured."""
    p = argparse.ArgumentParser(prog="gpu_check.py _seeds_bench")
    for name in ("--data", "--split", "--out", "--arch", "--device", "--result"):
        p.add_argument(name, required=True)
    p.add_argument("--batch-sizes", type=_int_list, required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--deadline-in", type=float, default=1e9)
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.deadline_in
    import gc
    import resource

    import torch

    from ssr_cli.artefacts import Shard
    from ssr_cli.data import open_dataset
    from ssr_cli.runtime import resolve_device
    from ssr_cli.stages import make_seeds

    dataset = open_dataset(a.data, layout="custom", split=a.split)
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    out = Path(a.out)
    last_total = 0.0
    for bs in a.batch_sizes:
        row: dict[str, Any] = {"batch_size": bs}
        if time.monotonic() + 1.5 * last_total > deadline:
            row["error"] = "skipped: time limit"
            _append(a.result, row)
            continue
        started = time.monotonic()
        cfg = make_seeds.SeedsConfig(
            arch=a.arch,
            weights="random",
            precision="auto",
            batch_size=bs,
            device=a.device,
            workers=a.workers,
            seed=0,
        )
        try:
            warm = dataclasses.replace(dataset, items=dataset.items[: 2 * bs])
            make_seeds.run(warm, out / f"warm-b{bs}", cfg, shard=Shard(), overwrite=True)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            manifest = make_seeds.run(dataset, out / f"b{bs}", cfg, shard=Shard(), overwrite=True)
            loop = sum(r["loop_seconds"] for r in manifest["timing"]["runs"])
            row.update(
                images=len(dataset),
                loop_s=round(loop, 3),
                images_per_s=round(len(dataset) / loop, 3),
                precision=manifest["config"]["precision_resolved"],
            )
            if cuda:
                row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                row["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        except oom:
            row["error"] = OOM
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            row["error"] = OOM if "out of memory" in text.lower() else text[:300]
        finally:
            for folder in (out / f"warm-b{bs}", out / f"b{bs}"):
                shutil.rmtree(folder, ignore_errors=True)  # ~1.2 MB of attention per image
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        last_total = time.monotonic() - started
        _append(a.result, row)
        if row.get("error") == OOM:
            break


def _append(path: str | Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def child_ddp(argv: list[str]) -> None:
    """``_ddp`` under torchrun: ssr's backend rule, its segmenter in DDP, AMP steps, collectives.

    ssr itself joins no process group at WORLD_SIZE=1 (``ssr_cli.train.distributed``), and NCCL
    refuses two ranks on one GPU, so on a one-GPU machine this is where nccl runs: the same
    calls ``init_distributed``, ``barrier``, ``all_reduce_sum``, ``all_gather_object`` and
    ``broadcast_object`` make, with ssr's loss and autocast."""
    p = argparse.ArgumentParser(prog="gpu_check.py _ddp")
    p.add_argument("--device", required=True)
    p.add_argument("--result", type=Path, required=True)
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    from ssr_cli.models.segmenter import SegmenterConfig, build_segmenter
    from ssr_cli.runtime import autocast, resolve_device, resolve_precision
    from ssr_cli.seg.loss import segmentation_loss

    device = resolve_device(a.device)
    backend = "nccl" if device.type == "cuda" else "gloo"  # ssr_cli.train.distributed.init_distributed
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        torch.manual_seed(0)
        model = build_segmenter(SegmenterConfig(num_classes=9, backbone="resnet18")).to(device)
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        precision = resolve_precision("auto", device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            x = torch.randn(2, 3, 96, 96, device=device)
            y = torch.randint(0, 9, (2, 96, 96), device=device)
            with autocast(device, precision):
                logits = net(x)
            loss = segmentation_loss(logits, y, "balanced")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        total = torch.tensor([float(losses[-1])], dtype=torch.float64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if backend == "nccl":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"rank": dist.get_rank(), "loss": losses[-1]})
        box = [{"from": "rank0"}]
        dist.broadcast_object_list(box, src=0)
        figures = {
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "precision": precision,
            "loss": losses[-1],
            "all_reduce": float(total.item()),
            "all_gather_ok": gathered[0]["loss"] == losses[-1],
            "broadcast_ok": box[0] == {"from": "rank0"},
        }
        if device.type == "cuda":
            figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if dist.get_rank() == 0:
            a.result.write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


CHILDREN = {"_env": child_env_facts, "_seeds_bench": child_seeds_bench, "_ddp": child_ddp}


# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if argv and argv[0] in CHILDREN:
        CHILDREN[argv[0]](argv[1:])
        return 0
    opts = parse_args(argv)
    for path in (opts.out, opts.work):
        try:
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"gpu_check: error: cannot create {path}: {exc.strerror}", file=sys.stderr)
            return 1
    if opts.work is None:
        opts.work = Path(tempfile.mkdtemp(prefix="ssr-gpu-check-")).resolve()
    if not (MODELS / "ssr-tiny-clip.json").is_file() or not (MODELS / "ssr-tiny-dino.json").is_file():
        print(f"gpu_check: error: the tiny models are missing in {MODELS}", file=sys.stderr)
        return 1
    check = Check(opts, argv)
    check.log_path.write_text(f"gpu_check started {check.started.isoformat()}: {' '.join(argv)}\n")

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        check.run_steps(build_steps(opts))
    except Interrupted:
        check.abort = "stopped by a signal"
        for step in build_steps(opts):
            check.results.setdefault(
                step.name, {"name": step.name, "what": step.what, "status": "skipped", "error": check.abort}
            )
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        check.write()
        if not opts.keep:
            shutil.rmtree(opts.work, ignore_errors=True)
    doc = json.loads((opts.out / "gpu_check.json").read_text())
    print((opts.out / "gpu_check.md").read_text())
    if not doc["all_ok"]:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
