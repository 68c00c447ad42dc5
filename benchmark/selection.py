"""Each variant's setting chosen from a study's sweep, on the validation split alone.

A run record of a swept study carries its ``setting`` (the swept keys' values), whether that is the
configured one (``default_setting``), its ``budget`` and its ``validation`` criteria (``evaluate`` measures
them on the validation split, apart from the test metrics in ``metrics``). Per (study, dataset, variant,
budget) a criterion picks the setting whose mean over the seeds that every eligible setting finished is
best; a setting with a diverged or failed run is never picked, and a cell that lacks a setting the variant
has elsewhere in the study (a study still running) is not decided. Each criterion gives a view of the
records, the tuned table of that criterion; the configured settings give the untuned view. Nothing here
reads ``metrics``: a test metric cannot move a selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from benchmark.metrics import keys as K
from benchmark.spec import format_value

# The criterion of each tuned view: the post-hoc ELBO (one posterior family for every decoder) and KID of
# prior samples against the validation images (the metric the sample table ranks by).
CRITERIA = {"likelihood": K.ELBO_POSTHOC, "samples": K.KID_PRIOR}
UNTUNED = "untuned: configured settings"


def tuned_view(name: str) -> str:
    return f"tuned for {name} on validation {CRITERIA[name]}"


def setting_label(record: dict) -> str:
    """``weight=10, sigma0=0.5`` (the last part of each swept key); empty for a run without a sweep."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in (record.get("setting") or {}).items())


def cell_of(record: dict) -> tuple:
    """What one selection is made for: (study, dataset, variant, budget)."""
    return tuple(str(record.get(k)) for k in ("study", "dataset", "variant", "budget"))


@dataclass
class Candidate:
    """One setting of a cell: its criterion values by seed (finished runs), and its runs that did not finish."""
    label: str
    default: bool
    values: dict
    n_bad: int = 0  # diverged or failed

    def mean(self, seeds=None) -> float:
        """The mean criterion over ``seeds`` (default: every seed it finished); NaN if one is not finite."""
        values = [self.values.get(s) for s in (self.values if seeds is None else seeds)]
        if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return math.nan
        return math.fsum(values) / len(values)


def candidates(records: Iterable[dict], criterion: str) -> dict[tuple, list[Candidate]]:
    """The settings of every cell with their values of ``criterion`` (from ``record["validation"]``)."""
    cells: dict[tuple, dict[str, Candidate]] = {}
    for r in records:
        if r.get("status") == "running":
            continue
        label = setting_label(r)
        c = cells.setdefault(cell_of(r), {}).setdefault(label, Candidate(label, r.get("default_setting", True), {}))
        if r.get("status") == "finished":
            c.values[r.get("seed")] = (r.get("validation") or {}).get(criterion)
        else:
            c.n_bad += 1
    return {cell: list(by_label.values()) for cell, by_label in cells.items()}


def select(records: Iterable[dict], criterion: str) -> dict[tuple, str]:
    """The chosen setting's label per cell. A variant without a sweep keeps its one setting. Otherwise, once
    the cell has every setting the variant has anywhere in the study, its configured one included: among the
    settings whose every run finished, the one with the best mean criterion over the seeds they all finished
    (paired; ties: the configured one, then the label). An undecided cell is left out."""
    records = list(records)
    better = K.HIGHER_IS_BETTER[criterion]
    grid: dict[tuple, set[str]] = {}  # (study, dataset, variant) -> every setting label it has
    for r in records:
        grid.setdefault(cell_of(r)[:3], set()).add(setting_label(r))
    chosen = {}
    for cell, options in candidates(records, criterion).items():
        if len(grid[cell[:3]]) == 1:
            chosen[cell] = options[0].label
            continue
        if {c.label for c in options} != grid[cell[:3]] or not any(c.default for c in options):
            continue  # a setting still to run
        ok = [c for c in options if c.n_bad == 0]
        seeds = set.intersection(*(set(c.values) for c in ok)) if ok else set()
        ok = [c for c in ok if seeds and math.isfinite(c.mean(seeds))]
        if ok:
            best = min(ok, key=lambda c: ((-1 if better else 1) * c.mean(seeds), not c.default, c.label))
            chosen[cell] = best.label
    return chosen


def swept_studies(records: Iterable[dict]) -> set[str]:
    """The studies of ``records`` that sweep a setting: those a selection is made for."""
    labels: dict[str, set[str]] = {}
    for r in records:
        labels.setdefault(str(r.get("study")), set()).add(setting_label(r))
    return {study for study, seen in labels.items() if len(seen) > 1}


def views(records: Sequence[dict]) -> list[tuple[str | None, list[dict]]]:
    """(view, records) pairs: the records of a study none of whose cells has two settings as they are (view
    None); of a swept study, one tuned view per criterion (each cell's chosen setting) and the untuned one
    (configured settings). Each record of a view is a copy that names it (``view``)."""
    swept = swept_studies(records)
    rest = [r for r in records if str(r.get("study")) not in swept]
    records = [r for r in records if str(r.get("study")) in swept]
    out = [(None, rest)] if rest or not records else []
    if not records:
        return out
    for name, criterion in CRITERIA.items():
        chosen = select(records, criterion)
        view = tuned_view(name)
        out.append((view, [{**r, "view": view} for r in records if chosen.get(cell_of(r)) == setting_label(r)]))
    out.append((UNTUNED, [{**r, "view": UNTUNED} for r in records if r.get("default_setting", True)]))
    return out


def at_edge(records: Iterable[dict], cell: tuple, label: str) -> bool:
    """Whether the setting ``label`` of ``cell`` puts a swept number at the smallest or the largest value the
    cell swept (of three or more): the best setting may then lie beyond the sweep."""
    settings = [r.get("setting") or {} for r in records if cell_of(r) == cell]
    chosen = next((s for s in settings if setting_label({"setting": s}) == label), {})
    for key, value in chosen.items():
        values = {s[key] for s in settings if isinstance(s.get(key), (int, float))}
        if isinstance(value, (int, float)) and len(values) >= 3 and value in (min(values), max(values)):
            return True
    return False
