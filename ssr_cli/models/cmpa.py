"""CMPA heads: ISA (image) and TSA (text) projections into a shared space of dimension d2.

Structure (METHOD.md section 2, "our choice"): each head is ``z = W x`` followed by a
residual MLP, ``head(x) = z + fc2(gelu(fc1(z)))``, with ``fc2`` zero-initialised, so
at step 0 a head is the linear map ``W`` exactly. Both heads start from the SAME
``W`` (separate, trainable copies); CLIP stays frozen.

Choice of the initial ``W`` (``HeadConfig.init``):

- ``d2 >= E`` (e.g. the tiny test CLIP, E = 32, with the default d2 = 256): ``W`` is
  a random ``[d2, E]`` matrix with orthonormal COLUMNS, an isometric embedding, so
  every cosine similarity, and therefore every CAM, is preserved exactly at step 0.
- ``d2 < E`` (ViT-B/16: E = 512, d2 = 256), ``init="pca"`` (default): the rows of
  ``W`` are an orthonormal basis of a subspace that CONTAINS the span of the class and
  background text embeddings (so ``<Wv, Wt> = <v, t>`` for every text t), completed by
  the top principal directions (uncentred) of the L2-normalised image embeddings of a
  sample of training images (so ``|Wv| ~ |v|`` and the cosines, hence the softmax of
  the CAM, barely move). A random orthonormal projection (``init="random"``) keeps
  cosines only up to ~1/sqrt(d2) noise and a per-image rescaling of the logits; the
  measured step-0 CAM correlations of both are in ``benchmarks/bench_cmpa.py``.

Layouts: ``project_image`` takes ``[..., E]`` (an image embedding [N, E], or projected
patch tokens [N, h*w, E]) and returns ``[..., d2]``; ``project_text`` the same for text
embeddings [K, E]. Nothing is L2-normalised here.

Imports torch: import lazily (inside command bodies).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssr_cli.errors import ArtefactError, ConfigError, WeightsError

HEADS_FILE = "heads.safetensors"
PROTOTYPES_FILE = "prototypes.safetensors"
CONFIG_KEY = "ssr_cmpa_heads"
INITS = ("pca", "random")
MIN_TEMPERATURE = 0.01  # CLIP clamps its logit scale at 100


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the heads: ``in_dim`` E (CLIP's embedding), ``dim`` d2, MLP ``hidden`` width."""

    in_dim: int
    dim: int = 256
    hidden: int = 256
    init: str = "pca"

    def __post_init__(self) -> None:
        if self.in_dim < 1 or self.dim < 1 or self.hidden < 1:
            raise ConfigError(
                f"head sizes must be positive (in {self.in_dim}, dim {self.dim}, hidden {self.hidden})"
            )
        if self.init not in INITS:
            raise ConfigError(f"--head-init {self.init!r} is not one of {', '.join(INITS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return cls(**{k: data[k] for k in ("in_dim", "dim", "hidden", "init") if k in data})


class ProjectionHead(nn.Module):
    """``[..., E] -> [..., d2]``: ``z = W x`` (no bias), then ``z + fc2(gelu(fc1(z)))``."""

    def __init__(self, in_dim: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        return z + self.fc2(self.act(self.fc1(z)))


class CmpaHeads(nn.Module):
    """ISA and TSA plus the learnable temperature of the prototype loss.

    ``forward(patches [N, L, E], texts [Q, E]) -> (ISA(patches) [N, L, d2], TSA(texts)
    [Q, d2], 1/tau scalar)``: everything that gets gradients goes through ``forward``
    so DistributedDataParallel sees it.
    """

    def __init__(self, cfg: HeadConfig, temperature: float = 0.05) -> None:
        super().__init__()
        if not MIN_TEMPERATURE <= temperature <= 10:
            raise ConfigError(f"--temperature {temperature} must be in [{MIN_TEMPERATURE}, 10]")
        self.cfg = cfg
        self.isa = ProjectionHead(cfg.in_dim, cfg.dim, cfg.hidden)
        self.tsa = ProjectionHead(cfg.in_dim, cfg.dim, cfg.hidden)
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def set_projection(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` [d2, E] into both heads' ``W`` (the shared starting point)."""
        with torch.no_grad():
            for head in (self.isa, self.tsa):
                head.proj.weight.copy_(weight.to(head.proj.weight))

    def inv_temperature(self) -> torch.Tensor:
        """1/tau as a 0-d tensor (tau clamped at 0.01 from below)."""
        return self.log_inv_tau.clamp(max=math.log(1.0 / MIN_TEMPERATURE)).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.inv_temperature().detach())

    def project_image(self, x: torch.Tensor) -> torch.Tensor:
        """ISA: [..., E] -> [..., d2]."""
        return self.isa(x)

    def project_text(self, x: torch.Tensor) -> torch.Tensor:
        """TSA: [..., E] -> [..., d2]."""
        return self.tsa(x)

    def forward(
        self, patches: torch.Tensor, texts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.isa(patches), self.tsa(texts), self.inv_temperature()


# ----------------------------------------------------------------------------- initial projections


def random_projection(in_dim: int, dim: int, seed: int) -> torch.Tensor:
    """[dim, in_dim] with orthonormal rows (dim <= in_dim) or columns (dim > in_dim), from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    big, small = max(in_dim, dim), min(in_dim, dim)
    q, r = torch.linalg.qr(torch.randn(big, small, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # a unique (Haar) draw
    return (q.t() if dim <= in_dim else q).float().contiguous()


def principal_projection(
    texts: torch.Tensor, image_moment: torch.Tensor, dim: int, seed: int = 0
) -> torch.Tensor:
    """[dim, E], orthonormal rows: span(texts) first, then the top eigenvectors of the
    image second moment restricted to the orthogonal complement.

    ``texts`` [T, E] (normalised text embeddings); ``image_moment`` [E, E] = mean of
    ``v v^T`` over normalised image embeddings v. When the texts span more than ``dim``
    directions, the top ``dim`` eigenvectors of (text moment + image moment), each
    scaled to unit trace, are used instead. ``dim >= E``: ``random_projection``.
    """
    e = image_moment.shape[0]
    if dim >= e:
        return random_projection(e, dim, seed)
    t = texts.double().cpu()
    m_img = image_moment.double().cpu()
    m_img = m_img / m_img.trace().clamp_min(1e-12)
    _, s, vh = torch.linalg.svd(t, full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum()) if s.numel() else 0
    if rank > dim:
        m_txt = t.t() @ t
        both = m_txt / m_txt.trace().clamp_min(1e-12) + m_img
        _, vecs = torch.linalg.eigh((both + both.t()) / 2)
        basis = vecs[:, -dim:].flip(-1)
    else:
        u_t = vh[:rank].t()  # [E, r]
        comp = torch.eye(e, dtype=torch.float64) - u_t @ u_t.t()
        rest = comp @ m_img @ comp
        _, vecs = torch.linalg.eigh((rest + rest.t()) / 2)
        basis = torch.cat([u_t, vecs[:, e - (dim - rank) :].flip(-1)], dim=1) if dim > rank else u_t
        basis, _ = torch.linalg.qr(basis)  # re-orthonormalise (numerical hygiene)
    return basis.t().float().contiguous()


# ----------------------------------------------------------------------------- files


def clip_identity(model: Any) -> dict[str, Any]:
    """What heads are tied to: CLIP architecture, QuickGELU and weights (sha256 or random:seed=N)."""
    source = model.weights_source
    weights = f"random:seed={model.seed}" if source.is_random else source.sha256
    return {"arch": model.arch, "quick_gelu": bool(model.quick_gelu), "weights": weights}


def save_heads(
    path: str | Path, heads: CmpaHeads, clip: dict[str, Any], extra: dict[str, Any] | None = None
) -> Path:
    """Write the heads' weights as safetensors; metadata holds the config and the CLIP identity."""
    from safetensors.torch import save_file

    from ssr_cli import __version__
    from ssr_cli.artefacts import atomic_write

    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in heads.state_dict().items()}
    meta = {"config": heads.cfg.to_dict(), "clip": clip, **(extra or {})}
    metadata = {CONFIG_KEY: json.dumps(meta, sort_keys=True), "ssr_tool_version": __version__, "format": "pt"}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)

    return atomic_write(Path(path), write)


def read_heads_file(path: str | Path) -> tuple[CmpaHeads, dict[str, Any]]:
    """(heads on the CPU, metadata) from a file written by :func:`save_heads`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(CONFIG_KEY)
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(
            f"cannot read CMPA heads ({type(exc).__name__})",
            path=path,
            hint="rerun ssr train-cmpa into that folder with --overwrite",
        ) from None
    if raw is None:
        raise WeightsError(
            "not a CMPA heads file (no ssr config in its metadata)",
            path=path,
            hint="pass a folder written by ssr train-cmpa",
        )
    meta = json.loads(raw)
    heads = CmpaHeads(HeadConfig.from_dict(meta["config"]))
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())[:200]
        raise WeightsError(f"heads do not fit their recorded config ({text})", path=path) from None
    return heads, meta


def load_heads(
    run_dir: str | Path, device: str | torch.device = "cpu", *, clip: Any = None
) -> tuple[CmpaHeads, str]:
    """(frozen eval-mode heads on ``device``, the run's fingerprint) from a train-cmpa run folder
    or an ``ssr train`` run folder (which trains the same heads beside its decoder).

    With ``clip`` (a ``ClipModel``), heads trained on another CLIP (architecture or
    weights) are refused: their projections would mean nothing for it.
    """
    from ssr_cli.artefacts import read_manifest

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtefactError(
            "CMPA run folder not found", path=run_dir, hint="pass the --out folder of ssr train-cmpa"
        )
    manifest = read_manifest(run_dir)
    command = {"cmpa": "train-cmpa", "train": "train"}.get(str(manifest.get("stage")))
    if command is None:
        raise ArtefactError(
            f"this folder holds a '{manifest.get('stage')}' run, not a train-cmpa or train run",
            path=run_dir,
            hint="pass the --out folder of ssr train-cmpa (or of ssr train)",
        )
    if not manifest.get("completed") or not (run_dir / HEADS_FILE).is_file():
        raise ArtefactError(
            f"this {command} run has not finished",
            path=run_dir,
            hint=f"resume it with ssr {command} ... --resume",
        )
    heads, meta = read_heads_file(run_dir / HEADS_FILE)
    if clip is not None:
        mine, theirs = clip_identity(clip), meta.get("clip", {})
        if mine != theirs:
            diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            raise ConfigError(
                f"the CMPA heads were trained on another CLIP ({', '.join(diff)} differ: "
                f"{', '.join(f'{theirs.get(k)} vs {mine.get(k)}' for k in diff)})",
                hint="use the --clip-arch/--clip-weights of the train-cmpa run",
            )
        if heads.cfg.in_dim != int(clip.embed_dim):
            raise ConfigError(
                f"the CMPA heads take {heads.cfg.in_dim}-d embeddings, CLIP gives {clip.embed_dim}"
            )
    heads.eval().requires_grad_(False)
    return heads.to(torch.device(device)), str(manifest.get("fingerprint"))
