"""The leaderboard, computed from the run records: tables over seeds, paired differences to a reference
variant, the comparison with published values, a user's rows beside another folder's, CSV and plots.

    latent-bench leaderboard [RESULTS_DIR] [--references FILE] [--reference-variant VARIANT] [--beside FOLDER]

``tables`` computes the numbers, ``references`` reads published values, ``render`` writes the markdown and
CSV, ``plots`` the figures; ``write_leaderboard`` runs them on one results folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from benchmark.errors import UsageError
from benchmark.leaderboard.plots import write_plots
from benchmark.leaderboard.references import load_references
from benchmark.leaderboard.render import (ALL_SETTINGS, beside_markdown, leaderboard_markdown, selection_markdown,
                                          write_csv, write_paired_csv)
from benchmark.leaderboard.tables import REFERENCE_VARIANT, PairedRow, aggregate, paired_differences
from benchmark.records import atomic_write, load_records
from benchmark.selection import swept_studies, views


def _records_of(root: Path, option: str = "RESULTS_DIR") -> list[dict]:
    if not root.is_dir():
        raise UsageError(f"results directory {root} does not exist; pass the folder that holds "
                         f"runs/<study>/*.json as {option}")
    records = load_records(root)
    if not records:
        raise UsageError(f"no run records under {root / 'runs'}; run a study first "
                         f"(latent-bench run STUDY.yaml) or pass the right {option}")
    return records


def write_leaderboard(results_dir: str | Path, references: str | Path | None = None,
                      reference_variant: str = REFERENCE_VARIANT, beside: Sequence[str | Path] = ()) -> Path:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard_paired.csv`` (differences to
    ``reference_variant``, paired by seed) and the plots into ``results_dir``; returns the .md. ``beside``:
    other results folders (e.g. the committed ``results``) whose rows are ranked with these."""
    root = Path(results_dir)
    records = _records_of(root)
    others = [(str(folder), aggregate(r for _, rs in views(_records_of(Path(folder), f"--beside {folder}"))
                                      for r in rs)) for folder in beside]
    refs_path = Path(references) if references else root / "references.yaml"
    if references and not refs_path.is_file():
        raise UsageError(f"references file {refs_path} does not exist; fix --references or drop it")
    refs = load_references(refs_path) if refs_path.is_file() else []
    selected = [r for _, rs in views(records) for r in rs]
    groups = aggregate(selected)
    paired = _paired_to(selected, reference_variant)
    swept = swept_studies(records)
    sweep = aggregate({**r, "view": ALL_SETTINGS} for r in records if str(r.get("study")) in swept)
    plots = write_plots(groups, root)
    write_csv(groups + sweep, root / "leaderboard.csv")
    write_paired_csv(paired, root / "leaderboard_paired.csv")
    md = root / "leaderboard.md"
    atomic_write(md, leaderboard_markdown(groups, refs, plots, n_records=len(records), paired=paired,
                                           selection=selection_markdown(sweep, records),
                                           beside=beside_markdown(groups, others) if others else ()))
    return md


def _paired_to(records: Sequence[dict], reference_variant: str) -> list[PairedRow]:
    """The paired differences; a reference variant that no record has is a usage error unless it is the
    default (a study without a VAE then simply has no paired section)."""
    known = sorted({str(r.get("variant")) for r in records})
    if reference_variant not in known and reference_variant != REFERENCE_VARIANT:
        raise UsageError(f"--reference-variant {reference_variant}: no record has that variant; choose one of "
                         f"{known}")
    return paired_differences(records, reference_variant)
