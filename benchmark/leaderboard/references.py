"""Published values the leaderboard compares with: the references file, the protocol fields in which a
measured table differs from a reference's, and the reproduction rows (measured, reference, gap)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from benchmark.errors import UsageError
from benchmark.leaderboard.tables import MIXED, Group, canonical


def load_references(path: str | Path) -> list[dict]:
    """The entries of a references YAML (see ``results/references.yaml``); bad files -> UsageError."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        entries = data["references"]
        for e in entries:
            for name in ("id", "dataset", "metric", "protocol", "values"):
                if name not in e:
                    raise KeyError(f"entry {e.get('id', '?')} lacks {name!r}")
            if any("variant" not in v for v in e["values"]):
                raise KeyError(f"a value of entry {e['id']} lacks 'variant'")
    except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
        raise UsageError(f"cannot read references from {path} ({e}); fix the file or pass --references "
                         "with a valid one") from e
    return entries


def protocol_differences(reference: dict, measured: dict, unchecked: Iterable[str] = ()) -> list[str]:
    """Why a measured protocol does not match a reference's, one phrase per field ([] when it matches).
    Only the reference's fields count, less ``unchecked`` and null ones (what the source does not state
    for sure)."""
    skip = set(unchecked)
    out = []
    for name, want in reference.items():
        if name in skip or want is None:
            continue
        if name not in measured:
            out.append(f"{name} not recorded (reference {want})")
        elif measured[name] == MIXED:
            out.append(f"{name} {MIXED}")
        elif canonical(measured[name]) != canonical(want):
            out.append(f"{name} {measured[name]} vs reference {want}")
    return out


def reproduction_rows(groups: Sequence[Group], references: Sequence[dict]) -> list[dict]:
    """One row per published value and matching (study, dataset, variant) group ("no runs" when the
    dataset has runs but not that variant); a reference's ``dataset`` is a data config key or a list of
    them. Measured value and difference are filled only where the protocol matches; otherwise ``why``
    says which field differs."""
    rows = []
    for ref in references:
        unchecked = ref.get("unsure", [])
        datasets = [ref["dataset"]] if isinstance(ref["dataset"], str) else list(ref["dataset"])
        for item in ref["values"]:
            base = dict(reference_id=ref["id"], dataset=datasets[0], metric=ref["metric"],
                        variant=item["variant"], label=item.get("label", item["variant"]),
                        reference=item.get("value"), study=None, measured=None, difference=None, why="")
            matches = [g for g in groups if g.dataset in datasets and g.variant == item["variant"]]
            if not matches and any(g.dataset in datasets for g in groups):
                rows.append({**base, "why": "no runs"})
            for g in matches:
                row = {**base, "study": g.study, "dataset": g.dataset}
                diffs = protocol_differences(ref["protocol"], g.protocol, unchecked)
                if not g.seeds:
                    row["why"] = "no finished runs"
                elif diffs:
                    row["why"] = "protocol differs: " + "; ".join(diffs)
                elif ref["metric"] not in g.stats:
                    row["why"] = f"{ref['metric']} not measured"
                else:
                    row["measured"] = g.stats[ref["metric"]]
                    if row["reference"] is None:
                        row["why"] = "no published value: " + item.get("note", "see references.yaml")
                    else:
                        row["difference"] = row["measured"].mean - row["reference"]
                        if unchecked:
                            row["why"] = "not checked: " + ", ".join(unchecked)
                rows.append(row)
    return rows
