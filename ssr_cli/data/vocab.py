"""Class vocabularies: class names, the text put into the CLIP prompts, background words.

Built-ins: ``voc`` (20 classes) and ``coco`` (80 classes), as CLIP-ES uses them
(see ``builtin_vocab.py``). A custom dataset brings a JSON file::

    {
      "name": "mydata",
      "classes": ["cat", {"name": "tv", "prompt": "tv monitor screen", "aliases": ["television"]}],
      "templates": ["a photo of a {}."],
      "background": ["ground", "sky"]
    }

- ``classes`` (required, non-empty): class id = position + 1 (id 0 is background,
  so do not list "background"). An entry is a name, or an object with ``name``,
  optional ``prompt`` (the text put into the templates, default the name; CLIP-ES
  folds synonyms into it, e.g. ``"person with clothes,people,human"``) and optional
  ``aliases`` (other spellings accepted in label files). Names may not contain
  commas. Names are matched case-insensitively, ignoring spaces, ``_`` and ``-``,
  so ``potted_plant``, ``Potted Plant`` and ``pottedplant`` are the same class;
  two classes that match each other are an error.
- ``templates`` (optional, default CLIP-ES's ``["a clean origami {}."]``): each
  holds exactly one ``{}``.
- ``background`` (optional, default the 25 VOC background words of CLIP-ES; ``[]``
  for none): words scored as background classes next to the foreground ones.
- ``name`` (optional, default the file name without ``.json``).

``Vocabulary.to_dict()`` writes this same format, so it round-trips.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssr_cli.data.builtin_vocab import (
    CLIP_ES_TEMPLATES,
    COCO_ALIASES,
    COCO_BACKGROUND,
    COCO_CLASSES,
    COCO_PROMPTS,
    VOC_ALIASES,
    VOC_BACKGROUND,
    VOC_CLASSES,
    VOC_PROMPTS,
)
from ssr_cli.errors import DataError

__all__ = [
    "COCO_CLASSES",
    "VOC_CLASSES",
    "Vocabulary",
    "builtin_vocabulary",
    "load_vocabulary",
    "name_key",
]

_ALLOWED_KEYS = {"name", "classes", "templates", "background"}
_ALLOWED_CLASS_KEYS = {"name", "prompt", "aliases"}


def name_key(name: str) -> str:
    """Matching key of a class name: lower case, without spaces, ``_`` and ``-``."""
    return re.sub(r"[\s_\-]+", "", name).lower()


class VocabularyError(ValueError):
    """An inconsistent vocabulary (turned into a DataError naming the file by the loader)."""

    def __init__(self, what: str, value: str | None = None, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.value = value
        self.hint = hint


@dataclass(frozen=True)
class Vocabulary:
    """Foreground classes (id = index + 1; id 0 = background) and their prompt text.

    ``aliases`` is empty or holds, per class, extra accepted spellings.
    """

    name: str
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    templates: tuple[str, ...]
    background: tuple[str, ...]
    aliases: tuple[tuple[str, ...], ...] = ()
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise VocabularyError("the vocabulary has no classes", hint="list at least one class")
        if len(self.prompts) != len(self.classes):
            raise VocabularyError("prompts and classes differ in length")
        if self.aliases and len(self.aliases) != len(self.classes):
            raise VocabularyError("aliases and classes differ in length")
        if not self.templates:
            raise VocabularyError("the vocabulary has no templates", hint='give e.g. ["a photo of a {}."]')
        for template in self.templates:
            _check_template(template)
        lookup: dict[str, int] = {}
        for index, name in enumerate(self.classes):
            if not isinstance(name, str) or not name.strip():
                raise VocabularyError(f"class {index + 1} has an empty name")
            if "," in name or "#" in name:
                raise VocabularyError(
                    f"class name {name!r} contains ',' or '#'", name, "put synonyms in the prompt instead"
                )
            if name_key(name) == "background":
                raise VocabularyError(
                    "do not list 'background' as a class", name, "id 0 is always background"
                )
            key = name_key(name)
            if key in lookup:
                other = self.classes[lookup[key] - 1]
                raise VocabularyError(f"duplicate class {name!r} (same as {other!r})", name)
            lookup[key] = index + 1
        for index, extra in enumerate(self.aliases):
            for alias in extra:
                key = name_key(alias)
                if lookup.get(key, index + 1) != index + 1:
                    other = self.classes[lookup[key] - 1]
                    raise VocabularyError(
                        f"alias {alias!r} of {self.classes[index]!r} is ambiguous with {other!r}", alias
                    )
                lookup[key] = index + 1
        object.__setattr__(self, "_lookup", lookup)

    @property
    def num_classes(self) -> int:
        """Foreground classes plus background."""
        return len(self.classes) + 1

    def class_id(self, name: str) -> int:
        """Id (1..K) of a class name or alias; case-insensitive, ignoring spaces/'_'/'-'.

        Raises ``KeyError`` for an unknown name.
        """
        key = name_key(name)
        if not key or key not in self._lookup:
            raise KeyError(name)
        return self._lookup[key]

    def class_name(self, class_id: int) -> str:
        """Name of id 0..K (0 = ``background``)."""
        if class_id == 0:
            return "background"
        return self.classes[class_id - 1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON vocabulary format (see module docstring); ``from_dict`` reads it back."""
        entries: list[Any] = []
        for index, (name, prompt) in enumerate(zip(self.classes, self.prompts, strict=True)):
            extra = self.aliases[index] if self.aliases else ()
            if prompt == name and not extra:
                entries.append(name)
            else:
                entry: dict[str, Any] = {"name": name, "prompt": prompt}
                if extra:
                    entry["aliases"] = list(extra)
                entries.append(entry)
        return {
            "name": self.name,
            "classes": entries,
            "templates": list(self.templates),
            "background": list(self.background),
        }

    def fingerprint(self) -> str:
        """Hash of what changes results: classes, prompts, templates, background (not name)."""
        from ssr_cli.artefacts import fingerprint

        return fingerprint(
            {
                "classes": list(self.classes),
                "prompts": list(self.prompts),
                "templates": list(self.templates),
                "background": list(self.background),
            }
        )

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "custom") -> Vocabulary:
        """Build from the JSON format. Raises ``VocabularyError`` on bad content."""
        if not isinstance(data, dict):
            raise VocabularyError("the vocabulary must be a JSON object with a 'classes' list")
        unknown = sorted(set(data) - _ALLOWED_KEYS)
        if unknown:
            raise VocabularyError(
                f"unknown key {unknown[0]!r}", unknown[0], "allowed: name, classes, templates, background"
            )
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes:
            raise VocabularyError("'classes' is missing or not a non-empty list", "classes")
        names: list[str] = []
        prompts: list[str] = []
        aliases: list[tuple[str, ...]] = []
        for index, entry in enumerate(classes):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise VocabularyError(
                    f"class {index + 1} must be a name or an object with a 'name'",
                    hint='e.g. "cat" or {"name": "tv", "prompt": "tv monitor screen"}',
                )
            bad = sorted(set(entry) - _ALLOWED_CLASS_KEYS)
            if bad:
                raise VocabularyError(
                    f"unknown key {bad[0]!r} in class {entry['name']!r}",
                    bad[0],
                    "allowed: name, prompt, aliases",
                )
            name = entry["name"].strip()
            prompt = entry.get("prompt", name)
            extra = entry.get("aliases", [])
            if not isinstance(prompt, str) or not prompt.strip():
                raise VocabularyError(f"class {name!r} has an empty or non-text prompt", name)
            if not isinstance(extra, list) or not all(isinstance(a, str) and a.strip() for a in extra):
                raise VocabularyError(f"'aliases' of class {name!r} must be a list of names", name)
            names.append(name)
            prompts.append(prompt.strip())
            aliases.append(tuple(a.strip() for a in extra))
        templates = _text_list(data, "templates", CLIP_ES_TEMPLATES, allow_empty=False)
        background = _text_list(data, "background", VOC_BACKGROUND, allow_empty=True)
        name = data.get("name", default_name)
        if not isinstance(name, str) or not name.strip():
            raise VocabularyError("'name' must be a non-empty text", "name")
        return cls(
            name=name.strip(),
            classes=tuple(names),
            prompts=tuple(prompts),
            templates=templates,
            background=background,
            aliases=tuple(aliases) if any(aliases) else (),
        )


def _text_list(data: dict, key: str, default: tuple[str, ...], allow_empty: bool) -> tuple[str, ...]:
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise VocabularyError(f"'{key}' must be a list of non-empty texts", key)
    if not value and not allow_empty:
        raise VocabularyError(f"'{key}' is empty", key)
    return tuple(v.strip() for v in value)


def _check_template(template: str) -> None:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise VocabularyError(
            f"template {template!r} must contain exactly one '{{}}'", str(template), 'e.g. "a photo of a {}."'
        )
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise VocabularyError(
            f"template {template!r} has braces other than one '{{}}'",
            template,
            "write a literal brace as '{{' or '}}'",
        ) from None


def builtin_vocabulary(name: str) -> Vocabulary:
    """``voc`` or ``coco`` (CLIP-ES's prompts, template and background words)."""
    key = name.lower()
    if key == "voc":
        classes, prompts, background, alias_map = VOC_CLASSES, VOC_PROMPTS, VOC_BACKGROUND, VOC_ALIASES
    elif key == "coco":
        classes, prompts, background, alias_map = COCO_CLASSES, COCO_PROMPTS, COCO_BACKGROUND, COCO_ALIASES
    else:
        raise KeyError(name)
    aliases = tuple(alias_map.get(c, ()) for c in classes)
    return Vocabulary(key, classes, prompts, CLIP_ES_TEMPLATES, background, aliases)


def _line_of(text: str, value: str | None, last: bool = False) -> int | None:
    """Best-effort line number of the first (or last) occurrence of ``value`` as a JSON string."""
    if not value:
        return None
    needle = json.dumps(value)
    position = text.rfind(needle) if last else text.find(needle)
    if position < 0:
        return None
    return text.count("\n", 0, position) + 1


def load_vocabulary(spec: str | Path | Vocabulary) -> Vocabulary:
    """``"voc"`` | ``"coco"`` | path to a vocabulary JSON file (format in the module docstring).

    Raises ``DataError`` naming the file (and line where known) for a missing or bad file.
    """
    if isinstance(spec, Vocabulary):
        return spec
    text_spec = str(spec)
    if isinstance(spec, str) and text_spec.lower() in ("voc", "coco") and not Path(text_spec).is_file():
        return builtin_vocabulary(text_spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            "vocabulary not found" if not path.exists() else "vocabulary is not a file",
            path=path,
            hint="use voc, coco or the path to a vocabulary JSON file",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read vocabulary: {exc}", path=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"vocabulary is not valid JSON: {exc.msg} (column {exc.colno})",
            path=path,
            line=exc.lineno,
            hint="see `ssr data check --help` for the format",
        ) from None
    try:
        return Vocabulary.from_dict(data, default_name=path.stem)
    except VocabularyError as exc:
        line = _line_of(text, exc.value, last=exc.what.startswith("duplicate"))
        raise DataError(f"bad vocabulary: {exc.what}", path=path, line=line, hint=exc.hint) from None
