"""What several test files share: the repository's paths, a tiny study, the console script, a free loopback
port, the progress lines of a study's output, and ``leaderboard.md`` read back as tables."""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TESTS = REPO / "tests"
DATASET = "digits_binary"
EVALUATION = {"iw_samples": 5, "fid_samples": 0, "max_codes": 100, "expost_epochs": 1, "gmm_components": 2}


def write_study(folder: Path, name: str, variants: list[str], seeds=(0,), epochs: int = 2, batches: int = 3,
                variant_overrides: dict | None = None) -> Path:
    """A study of ``variants`` on the embedded digits, a few batches of ``epochs`` epochs, a small evaluation."""
    study = {"name": name, "configs": str(CONFIGS), "trainer": "cpu", "datasets": [DATASET], "variants": variants,
             "seeds": list(seeds), "evaluation": EVALUATION,
             "overrides": {"trainer.max_epochs": epochs, "trainer.limit_train_batches": batches,
                           "trainer.enable_progress_bar": False}}
    if variant_overrides:
        study["variant_overrides"] = variant_overrides
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def progress_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[") and "| done " in line]


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("latent-bench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "benchmark.cli"]


def free_port() -> int:
    """A loopback port that nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- leaderboard.md read back ---------------------------------------------------------------------------------

CELL = re.compile(r"^(?P<mean>[-+]?[\d.e+-]+|inf|-inf|nan) ± (?P<ci>[\d.e+-]+|n/a) \((?P<n>\d+)(?:/(?P<of>\d+))?\)$")


@dataclass(frozen=True)
class Cell:
    """A ``mean ± h (n)`` cell, or a paired ``mean ± h (k/n)`` one (then ``n`` is k and ``of`` is n)."""
    mean: float
    ci: float | None
    n: int
    of: int | None = None


def cell(text: str) -> Cell | None:
    """The numbers of a statistics cell; None for anything else ("–", a name, a count)."""
    m = CELL.match(text.strip())
    if m is None:
        return None
    ci = None if m["ci"] == "n/a" else float(m["ci"])
    return Cell(float(m["mean"]), ci, int(m["n"]), None if m["of"] is None else int(m["of"]))


def markdown_tables(text: str) -> dict[tuple[str, ...], list[dict[str, str]]]:
    """Each table of a markdown document under its headings (the path of ``#``-headings above it, without
    the document's title), as rows of {column: cell text}. A second table under the same headings is keyed
    by the headings and the line of text above it (e.g. "Other metrics:"); two that the same key would name
    raise ValueError, rather than one hiding the other."""
    tables: dict[tuple[str, ...], list[dict[str, str]]] = {}
    path: list[str] = []
    caption = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            path = path[: max(level - 2, 0)] + [line.lstrip("#").strip()] if level > 1 else []
            caption = ""
        elif line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = _cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            key = tuple(path) if tuple(path) not in tables else (*path, caption)
            if key in tables:
                raise ValueError(f"two tables under the headings {list(path)} with the same line above them "
                                 f"({caption!r}): the one at line {i - len(rows) - 1} would replace an earlier one")
            tables[key] = rows
            continue
        elif line.strip():
            caption = line.strip()
        i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
