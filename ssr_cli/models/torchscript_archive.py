"""Read the tensors of a TorchScript archive (e.g. OpenAI's ``ViT-B-16.pt``) without running it.

``torch.jit.load`` executes code from the archive: a scripted ``__setstate__`` runs while
the module is restored, and it can write files. This reader never does. It parses the
archive's ``<prefix>/data.pkl`` with a restricted unpickler:

- ``__torch__.*`` globals (the TorchScript module classes) become inert placeholder
  classes; their state is the pickled attribute dict, kept as data. A module whose
  state is not a plain dict was saved by a scripted ``__getstate__``: only running its
  scripted ``__setstate__`` could make sense of it, so the archive is refused;
- tensors are rebuilt from the raw bytes of ``<prefix>/data/<key>`` (only
  ``torch._utils._rebuild_tensor_v2`` with a storage type of ``_STORAGE_DTYPES``);
- ``collections.OrderedDict`` and TorchScript's typed-list builders are allowed;
  every other global is refused.

Which tensors form the state dict (parameters and buffers, not other tensor
attributes) is read from the class definitions in ``<prefix>/code/``, parsed with
``ast`` (never executed). Imports torch: import this module lazily.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
CONVERT_HINT = (
    "ssr reads TorchScript archives without running them; convert this one in a trusted environment: "
    "python -c \"import torch; torch.save(torch.jit.load('IN.pt').state_dict(), 'OUT.pt')\", then pass OUT.pt"
)


class ArchiveError(ValueError):
    """The archive cannot be read safely (the message says why)."""


class ScriptObject:
    """Inert stand-in for a pickled TorchScript object: its class name and its attribute dict."""

    type_name = "?"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:  # BUILD: keep the data, never run the archive's code
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ArchiveError(
                f"module {self.type_name} saves its state with a scripted __getstate__/__setstate__, "
                "which only running the archive's code could restore"
            )
        self.state = state


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_rest: Any
) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise ArchiveError("a tensor refers to something that is not a storage")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)):
        raise ArchiveError("a tensor has a negative or non-integer size, stride or offset")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
    if any(n == 0 for n in size):
        return torch.empty(size, dtype=storage.dtype)
    if last >= storage.numel():
        raise ArchiveError("a tensor reaches past the end of its storage")
    return storage.as_strided(size, stride, offset)  # shares the storage, as torch.jit.load's tensors do


def _typed_list(values: Any) -> list[Any]:
    return list(values)


def _restore_type_tag(value: Any, _type_str: Any) -> Any:
    return value


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _typed_list,
    ("torch.jit._pickle", "build_doublelist"): _typed_list,
    ("torch.jit._pickle", "build_boollist"): _typed_list,
    ("torch.jit._pickle", "build_tensorlist"): _typed_list,
    ("torch.jit._pickle", "build_strlist"): _typed_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
    """Builds only placeholders, tensors from raw bytes and plain containers."""

    def __init__(self, data: bytes, read_record: Callable[[str], bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._classes: dict[str, type] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            full = f"{module}.{name}"
            if full not in self._classes:
                self._classes[full] = type(name, (ScriptObject,), {"type_name": full})
            return self._classes[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise ArchiveError(f"the archive's data refers to {module}.{name}, which is not allowed")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if not ok or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str):
            raise ArchiveError(f"unexpected persistent reference {str(pid)[:80]}")
        key, dtype = pid[2], pid[1].dtype
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise ArchiveError(f"storage data/{key} has a size that is not a multiple of {item}")
            if not raw:
                self._storages[key] = torch.empty(0, dtype=dtype)
            else:
                self._storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype)
        return self._storages[key]


def _prefix(archive: zipfile.ZipFile) -> str:
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ArchiveError("no single <archive>/data.pkl in the zip: not a TorchScript archive")
    return pkls[0][: -len("data.pkl")]


def _class_members(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{qualified class name: names in its ``__parameters__`` and ``__buffers__``} from ``code/``.

    Refuses an archive whose code defines a ``__setstate__`` (``torch.jit.load`` would run it).
    """
    members: dict[str, set[str]] = {}
    for name in archive.namelist():
        if not (name.startswith(prefix + "code/") and name.endswith(".py")):
            continue
        rel = PurePosixPath(name[len(prefix + "code/") : -len(".py")])
        module = ".".join(rel.parts)
        try:
            tree = ast.parse(archive.read(name).decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise ArchiveError(f"cannot parse {name}: {exc}") from None
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                _refuse_setstate(node, f"{module}.{node.name}")
                members[f"{module}.{node.name}"] = _listed_names(node)
    return members


def _refuse_setstate(node: ast.ClassDef, qualified: str) -> None:
    for stmt in node.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__setstate__":
            raise ArchiveError(
                f"module {qualified} has a scripted __setstate__ (code that loading would run)"
            )


def _listed_names(node: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for stmt in node.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        target = stmt.targets[0]
        if isinstance(target, ast.Name) and target.id in ("__parameters__", "__buffers__"):
            if isinstance(stmt.value, ast.List | ast.Tuple):
                names.update(str(e.value) for e in stmt.value.elts if isinstance(e, ast.Constant))
    return names


def _collect(obj: ScriptObject, members: dict[str, set[str]], prefix: str, out: dict[str, Any]) -> None:
    listed = members.get(obj.type_name)
    for key, value in getattr(obj, "state", {}).items():
        if isinstance(value, ScriptObject):
            _collect(value, members, f"{prefix}{key}.", out)
        elif isinstance(value, torch.Tensor) and (listed is None or key in listed):
            out[f"{prefix}{key}"] = value


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive ``path``, as a flat CPU state dict.

    Runs nothing from the archive. Raises ``ArchiveError`` when the archive cannot be
    read this way, and ``zipfile``/``OSError`` errors for broken files.
    """
    with zipfile.ZipFile(path) as archive:
        prefix = _prefix(archive)

        budget = max(4 * Path(path).stat().st_size, 1 << 20)  # a compressed record may not explode

        def read_record(name: str) -> bytes:
            try:
                info = archive.getinfo(prefix + name)
            except KeyError:
                raise ArchiveError(f"the archive has no record {name}") from None
            if info.file_size > budget:
                raise ArchiveError(f"record {name} unpacks to {info.file_size} bytes, far more than the file")
            return archive.read(info)

        members = _class_members(archive, prefix)
        root = _Unpickler(read_record("data.pkl"), read_record).load()
        if not isinstance(root, ScriptObject):
            raise ArchiveError("the archive's data.pkl does not hold a module")
        state: dict[str, torch.Tensor] = {}
        _collect(root, members, "", state)
    return state
