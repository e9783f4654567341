"""Help and README match the code and the repository (issue 15 item 6).

Every document the help or the README cites must be in the repository (``docs/``), and every
"section N" it cites must be a heading there; usage lines name arguments plainly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from ssr_cli.cli import app, main

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
# a cited document (an upper-case name such as METHOD.md, or any file under docs/), optionally
# followed by "section N" / "sections N, M and K"; output files (ablation.md) are not citations
REFERENCE = re.compile(
    r"((?:[\w.-]+/)*[A-Z][A-Z_]+\.md|docs/[\w./-]+\.md)\b(?:\]\([^)]*\))?(?:'s)?"
    r"(?:\s+sections?\s+(\d+(?:(?:,\s*|\s+and\s+)\d+)*))?"
)


def command_paths() -> list[list[str]]:
    """Every command and sub-command of ``ssr`` as its argv prefix."""
    paths: list[list[str]] = [[]]

    def walk(command: object, prefix: list[str]) -> None:
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def references(text: str) -> list[tuple[str, list[str]]]:
    flat = " ".join(text.split())
    found = []
    for match in REFERENCE.finditer(flat):
        sections = re.findall(r"\d+", match.group(2) or "")
        found.append((match.group(1), sections))
    return found


def check_reference(doc: str, sections: list[str], where: str) -> None:
    if doc in ("README.md",):
        return
    if not doc.startswith("docs/") and not sections:  # a file of the repository named by its path
        assert (REPO / doc).is_file(), f"{where} cites {doc}, which is not a file of the repository"
        return
    assert doc.startswith("docs/"), f"{where} cites {doc}, which is not in docs/ of the repository"
    path = REPO / doc
    assert path.is_file(), f"{where} cites {doc}, which does not exist"
    headings = re.findall(r"^#+\s+(\d+)[a-z]?\.", path.read_text(encoding="utf-8"), flags=re.M)
    for section in sections:
        assert section in headings, f"{where} cites {doc} section {section}; its sections: {headings}"


def test_every_document_the_help_cites_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    cited = 0
    for argv in command_paths():
        text = help_text(argv, capsys)
        usage = text.splitlines()[0]
        assert "{" not in usage and "<list[" not in text, f"ssr {' '.join(argv)}: {usage}"
        for doc, sections in references(text):
            check_reference(doc, sections, f"ssr {' '.join(argv)} --help")
            cited += 1
    assert cited >= 2  # refine --crf and predict --crf cite docs/METHOD.md section 4


def test_every_document_the_readme_cites_resolves() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    refs = references(text)
    assert any(doc == "docs/METHOD.md" and sections for doc, sections in refs)
    for doc, sections in refs:
        check_reference(doc, sections, "README.md")


def test_the_reference_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="not in docs/"):
        for doc, sections in references("see METHOD.md section 4"):
            check_reference(doc, sections, "x")
    with pytest.raises(AssertionError, match="section 9"):
        for doc, sections in references("see docs/METHOD.md section 9"):
            check_reference(doc, sections, "x")
    assert references("docs/METHOD.md sections 1, 3 and 4") == [("docs/METHOD.md", ["1", "3", "4"])]


def test_help_says_what_the_code_does(capsys: pytest.CaptureFixture[str]) -> None:
    fit = " ".join(help_text(["fit-seg"], capsys).split())
    assert "--head deeplabv3plus, the default" in fit
    seeds = " ".join(help_text(["make-seeds"], capsys).split())
    assert "model-config JSON file" in seeds


def test_missing_backbone_hint_names_the_documented_flag(tmp_path: Path) -> None:
    from ssr_cli.errors import WeightsError
    from ssr_cli.models.weights import resolve_weights

    with pytest.raises(WeightsError) as exc:
        resolve_weights("backbone", "resnet18", tmp_path / "nope.pth", env_var="X_UNSET",
                        cache_candidates=[], download=None)  # fmt: skip
    assert (
        "--no-pretrained" in exc.value.one_line() and "--backbone-weights random" not in exc.value.one_line()
    )
