"""Where model weights come from: an explicit file, an env var, a local cache, or a download.

Generic over the model kind (``clip`` now, ``dino`` and segmenter backbones later).
Resolution order (METHOD.md section 7):

1. the explicit value of the command's flag (``--clip-weights PATH``): a file, a
   folder holding one of the expected files, or ``random`` (random init, for smoke runs);
2. the environment variable (``SSR_CLIP_WEIGHTS``), with the same meaning;
3. local cache files: ours (``$SSR_CACHE/weights/<kind>/`` or
   ``~/.cache/ssr-cli/weights/<kind>/``) and the places other tools download to
   (the Hugging Face hub cache, ``~/.cache/clip`` of OpenAI's ``clip`` package);
4. a download, only when online. Offline detection is fast: ``HF_HUB_OFFLINE=1``
   or a failed 2 s TCP connect to the hub host means offline, and a one-line
   ``WeightsError`` says which file to put where.

torch is imported only inside ``read_state_dict``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ssr_cli.errors import WeightsError

ORIGINS = ("flag", "env", "cache", "download", "random")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HUB_HOST = "huggingface.co"
_ONLINE_TIMEOUT_S = 2.0
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightsSource:
    """Resolved weights: ``path`` is None only for ``origin == "random"``."""

    kind: str
    name: str
    path: Path | None
    origin: str
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        return self.origin == "random"

    def with_sha256(self) -> WeightsSource:
        """A copy with the file's SHA-256 filled in (cached per path, size and mtime)."""
        if self.path is None or self.sha256 is not None:
            return self
        return replace(self, sha256=file_sha256_cached(self.path))

    def describe(self) -> dict[str, Any]:
        """For manifests: kind, name, origin, path, sha256."""
        return {
            "kind": self.kind,
            "name": self.name,
            "origin": self.origin,
            "path": None if self.path is None else str(self.path),
            "sha256": self.sha256,
        }


def file_sha256_cached(path: str | Path) -> str:
    """SHA-256 of a file, remembered in memory per (path, size, mtime)."""
    from ssr_cli.artefacts.fingerprint import file_sha256

    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_sha256(str(resolved))
    return _HASH_CACHE[key]


def ssr_cache_dir() -> Path:
    """Root of this tool's cache: ``$SSR_CACHE``, else ``~/.cache/ssr-cli``."""
    env = os.environ.get("SSR_CACHE", "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/ssr-cli").expanduser()


def weights_cache_dir(kind: str) -> Path:
    """Our cache folder for one kind of weights: ``<ssr cache>/weights/<kind>/``."""
    return ssr_cache_dir() / "weights" / kind


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hf_hub_cached_files(repo_id: str, filenames: Sequence[str]) -> list[Path]:
    """Files of a hub repo in the local hub cache, as the hub client resolves them (the
    snapshot ``refs/main`` names, not any stale one), in ``filenames`` order."""
    folder = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        return []  # the usual case answers without importing huggingface_hub
    from huggingface_hub import try_to_load_from_cache

    found: list[Path] = []
    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_hub_cache_dir())
        if isinstance(hit, str):
            found.append(Path(hit))
    return found


def is_offline(host: str = HUB_HOST, timeout: float = _ONLINE_TIMEOUT_S) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, or a TCP connect to ``host:443`` fails within ``timeout``.

    The connect (including the DNS look-up, which has no timeout of its own) runs
    in a daemon thread, so this returns within about ``timeout`` seconds.
    """
    for var in ("HF_HUB_OFFLINE", "SSR_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint and host == HUB_HOST:
        host = urlparse(endpoint).hostname or host
    result: list[bool] = []

    def _probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=_probe, daemon=True, name="ssr-online-probe")
    thread.start()
    thread.join(timeout)
    return not (result and result[0])


def _flag_for(kind: str) -> str:
    return f"--{kind}-weights"


def _random_flag(kind: str) -> str:
    """How a user asks for random weights: fit-seg's backbone has its own flag."""
    return "--no-pretrained" if kind == "backbone" else f"{_flag_for(kind)} random"


def _pick_in_folder(folder: Path, expected: Sequence[str]) -> Path | None:
    for name in expected:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files[0] if len(files) == 1 else None


def _explicit(
    kind: str, name: str, value: str, origin: str, expected: Sequence[str], given_by: str
) -> WeightsSource:
    if value.strip().lower() == "random":
        return WeightsSource(kind=kind, name=name, path=None, origin="random")
    path = Path(value).expanduser()
    if path.is_dir():
        picked = _pick_in_folder(path, expected)
        if picked is None:
            wanted = ", ".join(expected) if expected else "one weights file"
            raise WeightsError(
                f"no {kind} weights file found in this folder",
                path=path,
                hint=f"put {wanted} there, or pass the file itself",
            )
        path = picked
    elif not path.is_file():
        raise WeightsError(
            f"{kind} weights file not found (given by {given_by})",
            path=path,
            hint=f"check the path, or use {_random_flag(kind)} for a smoke run",
        )
    return WeightsSource(kind=kind, name=name, path=path, origin=origin)


def resolve_weights(
    kind: str,
    name: str,
    explicit: str | Path | None,
    *,
    env_var: str,
    cache_candidates: Sequence[Path],
    download: Callable[[], Path] | None,
    host: str = HUB_HOST,
) -> WeightsSource:
    """Find the weights file for model ``name`` of ``kind`` (see the module docstring for the order).

    ``cache_candidates`` are full paths, best first; their file names are the
    expected names named in error messages. ``download`` fetches the file and
    returns its path (called only when online); None means no download exists.
    Raises ``WeightsError`` with one line saying what to do.
    """
    expected = list(dict.fromkeys(p.name for p in cache_candidates))
    if explicit is not None and str(explicit).strip():
        return _explicit(kind, name, str(explicit).strip(), "flag", expected, _flag_for(kind))
    env_value = os.environ.get(env_var, "").strip()
    if env_value:
        return _explicit(kind, name, env_value, "env", expected, f"${env_var}")
    for candidate in cache_candidates:
        if candidate.is_file():
            return WeightsSource(kind=kind, name=name, path=candidate, origin="cache")
    ours = weights_cache_dir(kind)
    wanted = " or ".join(expected[:3]) if expected else f"the {name} weights file"
    where = (
        f"put {wanted} into {ours}/ or pass {_flag_for(kind)} PATH (or set {env_var}); "
        f"{_random_flag(kind)} runs with random weights for a smoke test"
    )
    if download is None:
        raise WeightsError(f"no local {kind} weights for {name} and no known download", hint=where)
    if is_offline(host):
        raise WeightsError(
            f"no local {kind} weights for {name} and the hub cannot be reached (offline)", hint=where
        )
    try:
        path = Path(download())
    except Exception as exc:  # network and hub errors of any library
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"downloading {kind} weights for {name} failed: {first}", hint=where) from exc
    if not path.is_file():
        raise WeightsError(f"the download of {kind} weights for {name} gave no file", path=path, hint=where)
    return WeightsSource(kind=kind, name=name, path=path, origin="download")


def sniff_format(path: str | Path) -> str:
    """``safetensors``, ``torchscript`` (a TorchScript zip archive) or ``torch`` (anything else),
    from the file's content, not its suffix."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28):
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                return "torchscript"
    return "torch"


_REFUSED_MARKS = ("Weights only load failed", "weights_only", "Unsupported global", "UnpicklingError")
_SAVE_TENSORS_HINT = (
    "in an environment you trust, load it and save only its tensors: "
    "torch.save(state_dict, 'OUT.pt') or safetensors; then pass OUT.pt"
)


def load_failure(exc: BaseException, kind: str) -> tuple[str, str]:
    """(what, hint) for a file that ``torch.load(weights_only=True)`` refused or could not read.

    torch's own text for refused files is long and ends with advice to set
    ``weights_only=False`` (which would run code from the file): this replaces it."""
    import pickle

    text = " ".join(str(exc).split())
    if "TorchScript archive" in text:
        return (
            f"cannot read {kind}: the file is a TorchScript archive (ssr reads those only as CLIP weights)",
            "in an environment you trust: torch.save(torch.jit.load('IN.pt').state_dict(), 'OUT.pt'); "
            "then pass OUT.pt",
        )
    if isinstance(exc, pickle.UnpicklingError) or any(mark in text for mark in _REFUSED_MARKS):
        found = re.search(r"(?:GLOBAL|[Gg]lobals?:)\s*([\w.]+)", text)
        detail = f" (e.g. {found.group(1).rstrip('.')})" if found else ""
        return (
            f"cannot read {kind}: the file holds Python objects besides tensors{detail}, which ssr "
            "never unpickles (that could run code from the file)",
            _SAVE_TENSORS_HINT,
        )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (
        f"cannot read {kind} ({first})",
        "the file is truncated, corrupted or not a weights file: download it again",
    )


def torch_load(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with torch's warnings silenced and every
    failure a one-line ``WeightsError`` naming the file (``load_failure``)."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to replace
        what, hint = load_failure(exc, kind)
        raise WeightsError(what, path=path, hint=hint) from None


def _read_torchscript(path: Path, kind: str) -> dict[str, Any]:
    """The tensors of a TorchScript archive, read without running any of its code."""
    from ssr_cli.models.torchscript_archive import CONVERT_HINT, ArchiveError, read_torchscript_state_dict

    try:
        return dict(read_torchscript_state_dict(str(path)))
    except ArchiveError as exc:
        raise WeightsError(
            f"refused {kind} TorchScript archive: {exc}", path=path, hint=CONVERT_HINT
        ) from None


def read_state_dict(path: str | Path, kind: str = "model") -> tuple[dict[str, Any], str]:
    """Read a weights file into a flat CPU state dict; returns (state_dict, format).

    Formats (``sniff_format``): safetensors; a TorchScript archive such as OpenAI's
    ``ViT-B-16.pt``, whose tensors are read without running it (never ``torch.jit.load``,
    which runs the archive's code; see ``torchscript_archive``); anything else with
    ``torch.load(weights_only=True)``.
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DistributedDataParallel's
    ``module.`` prefixes are removed; non-tensor entries are dropped. Raises
    ``WeightsError`` naming the file when it cannot be read (truncated, corrupted).
    """
    import torch

    path = Path(path)
    try:
        fmt = sniff_format(path)
        if fmt == "safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        elif fmt == "torchscript":
            raw = _read_torchscript(path, kind)
        else:
            raw = torch_load(path, f"{kind} weights")
    except WeightsError:
        raise
    except Exception as exc:  # any unreadable file is the user's to replace
        what, hint = load_failure(exc, f"{kind} weights")
        raise WeightsError(what, path=path, hint=hint) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict):
        raise WeightsError(f"{kind} weights: not a state dict (a {type(raw).__name__})", path=path)
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if not state:
        raise WeightsError(f"{kind} weights: the file holds no tensors", path=path)
    return state, fmt


def state_dict_mismatch(target: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """How ``state`` fails to fit ``target`` (a model's state dict), or None when it fits.

    E.g. "2 missing (e.g. proj), 1 of another shape (e.g. conv1.weight (64, 3) vs (32, 3))".
    """
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        parts.append(f"{len(wrong)} of another shape (e.g. {k} {shapes})")
    return ", ".join(parts) or None
