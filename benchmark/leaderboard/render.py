"""The leaderboard as text: ``leaderboard.md`` (the tables, the protocol of their numbers, the selection
of each swept setting, the rankings across budgets, the paired differences, a user's rows beside another
folder's, the references) and its CSV files."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from benchmark.metrics import keys as K
from benchmark.leaderboard.references import reproduction_rows
from benchmark.leaderboard.tables import (BESIDE_COLUMNS, HEADLINE, HEADLINE_KEYS, MIXED, PRIMARY, Group, PairedDiff,
                                          PairedRow, beside_tables, budget_order, changed_places, column_name,
                                          metric_order, primary_keys, rank, ranking_orders, table_title, tables_of)
from benchmark.records import atomic_write
from benchmark.selection import CRITERIA, at_edge, select, setting_label, tuned_view


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _number(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _arrow(name: str) -> str:
    return {True: "↑", False: "↓"}.get(K.HIGHER_IS_BETTER.get(name), "")


# What a table's likelihood numbers are (the run protocol's ``likelihood_kind``), in words.
LIKELIHOOD_KINDS = {
    "discrete": "a log-probability of the discrete pixels (bits/dim comparable with any discrete model)",
    "dequantized": "a density on uniformly dequantised pixels: a lower bound on the log-probability of the "
                   "discrete pixels (bits/dim comparable with any discrete model)",
    "density_on_grid": "a density evaluated at the 8-bit grid values: not a probability of anything discrete, "
                       "not comparable with bits/dim, and unbounded as the decoder's scale shrinks",
}


def _protocol_lines(table: Sequence[Group]) -> list[str]:
    """What the likelihood columns of a table mean: the likelihood's kind, K, and the posterior behind each
    ELBO key, from the runs' protocols (older records lack the fields and get no line)."""
    def shared(field):
        values = {str(g.protocol.get(field)) for g in table if g.protocol.get(field) is not None}
        return values.pop() if len(values) == 1 else (MIXED if values else None)

    lines = []
    kind, likelihood = shared("likelihood_kind"), shared("likelihood")
    if kind is not None:
        lines.append(f"Likelihood `{likelihood}`: {LIKELIHOOD_KINDS.get(kind, kind)}.")
    ks = shared("iw_ks")
    if ks is not None:
        lines.append(f"`nll_iw` is -log p(x) by importance sampling at the largest K of {ks} (`nll_iw_k<K>` at "
                     f"each), with the post-hoc posterior as proposal. `elbo_posthoc`: the ELBO of one post-hoc "
                     f"posterior family fitted alike to every decoder (an amortised full-covariance Gaussian from x, "
                     f"started at the encoder's); `elbo`: the encoder's own posterior (stochastic encoders only).")
    return lines + [""] if lines else []


def _budget_line(table: Sequence[Group]) -> str:
    """The table's training budget and seeds, so that no cell is read without them."""
    epochs = sorted({str(g.protocol.get("epochs")) for g in table if g.protocol.get("epochs") not in (None, MIXED)})
    seeds = sorted({len(g.seeds) for g in table})
    budget = f"{' / '.join(epochs)} epochs" if epochs else "budget not recorded"
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return (f"Trained {budget}; {n} seed(s) a row" + (" (one seed: no CI, the cells read ± n/a)."
                                                      if seeds == [1] else "."))


def leaderboard_markdown(groups: Sequence[Group], references: Sequence[dict] = (), plots: Sequence[str] = (),
                         n_records: int = 0, paired: Sequence[PairedRow] = (), selection: Sequence[str] = (),
                         beside: Sequence[str] = ()) -> str:
    lines = ["# Leaderboard", "",
             f"Computed from {n_records} run records. Cells: mean ± 95% CI half-width (Student t) (n seeds); "
             "↑ higher is better, ↓ lower is better. Diverged and failed runs are counted, not averaged.", ""]
    lines += selection
    for key, table in tables_of(groups).items():
        lines += [f"## {table_title(key)}", "", _budget_line(table), ""]
        present = sorted({k for g in table for k in g.stats}, key=metric_order)
        headline = set(HEADLINE_KEYS)
        lines += _protocol_lines(table)
        panels = [(title, rank(table, title), [k for k in cols if k in present]) for title, cols in HEADLINE.items()]
        panels.append(("Latent space", table, [k for k in present if k not in headline]))
        shown = VIEW_PANELS.get(key[1])  # a tuned view shows the tables of its own criterion
        for title, ordered, cols in panels if shown is None else [p for p in panels if p[0] in shown]:
            if not cols and title != "Likelihood":  # the likelihood table always shows the runs' counts
                continue
            family = primary_keys(table, title) if title in PRIMARY else None
            family = family and [k for k in family if any(k in g.stats for g in table)]  # the keys it ranks on
            if family:
                title += f", ranked by {column_name(family[0], table)}" + (
                    f" ({', '.join(family[1:])} where it is missing)" if len(family) > 1 else "")
            elif title in PRIMARY:
                title += ", unranked (no variant reports its metric)"
            else:
                title += ", in the likelihood table's order"
            lines += [f"### {title}", ""]
            rows = [[str(i), g.label, *[g.stats[k].cell() if k in g.stats else "–" for k in cols],
                     str(g.n_diverged), str(g.n_failed)] for i, g in enumerate(ordered, 1)]
            lines += _md_table(["rank", "variant", *(column_name(k, table) for k in cols), "diverged", "failed"],
                               rows) + [""]
        running = sum(g.n_running for g in table)
        if running:
            lines += [f"{running} run(s) still running, not counted.", ""]
    lines += beside
    lines += rankings_markdown(groups)
    lines += paired_markdown(paired, groups)
    rows = reproduction_rows(groups, references)
    if rows:
        lines += ["## Reproduction of published values", "",
                  "Measured and difference are shown only where the recorded protocol matches the source's.",
                  ""]
        cells = [[r["study"] or "–", f"{r['label']} ({r['variant']})", r["dataset"], column_name(r["metric"]),
                  r["measured"].cell() if r["measured"] else "–", _number(r["reference"]),
                  _number(r["difference"]), r["reference_id"], r["why"]] for r in rows]
        lines += _md_table(["study", "variant", "dataset", "metric", "measured", "reference", "difference",
                            "source", "note"], cells) + [""]
    for name in plots:
        lines += [f"![{Path(name).stem}]({name})", ""]
    return "\n".join(lines)


def paired_markdown(rows: Sequence[PairedRow], groups: Sequence[Group] = ()) -> list[str]:
    """Markdown lines of the paired differences per (study, dataset): the ``HEADLINE`` metrics, then every
    other metric, variants in the table's rank order (from ``groups``), one column per metric that has a
    direction (p-values, rates and null values are left to the CSV)."""
    if not rows:
        return []
    reference = rows[0].reference
    lines = [f"## Paired differences to {reference}", "",
             f"Cells: mean of (variant - {reference}) over the seeds both finished ± 95% CI half-width "
             f"(Student t) (seeds where the difference has the sign of the mean / seeds paired). "
             f"With ↓ metrics a negative difference favours the variant, with ↑ ones a positive one.", ""]
    order = {key: [g.label for g in table] for key, table in tables_of(groups).items()}
    tables: dict[tuple, dict[str, dict[str, PairedDiff]]] = {}
    for row in rows:
        tables.setdefault(row.table, {}).setdefault(row.variant, {})[row.metric] = row.diff
    for key, by_variant in tables.items():
        ranked = order.get(key, [])
        variants = sorted(by_variant, key=lambda v: (ranked.index(v) if v in ranked else len(ranked), v))
        present = sorted({k for cells in by_variant.values() for k in cells
                          if K.HIGHER_IS_BETTER.get(k, False) is not None}, key=metric_order)
        if not present:
            continue
        lines += [f"### {table_title(key)}", ""]
        for title, cols in (("", [k for k in HEADLINE_KEYS if k in present]),
                            ("Other metrics", [k for k in present if k not in HEADLINE_KEYS])):
            if not cols:
                continue
            if title:
                lines += [f"{title}:", ""]
            cells = [[v, *[by_variant[v][k].cell() if k in by_variant[v] else "–" for k in cols]]
                     for v in variants]
            lines += _md_table(["variant", *map(column_name, cols)], cells) + [""]
    return lines


def beside_markdown(groups: Sequence[Group], beside: Sequence[tuple[str, Sequence[Group]]]) -> list[str]:
    """``beside_tables`` as markdown: the user's rows in bold, each of theirs with its protocol differences."""
    lines = ["## Beside other results", ""]
    tables = beside_tables(groups, beside)
    if not tables:
        return lines + ["No other folder has finished runs on these datasets.", ""]
    lines += ["Your rows (**bold**) ranked with the finished rows of the other folders on the same dataset and in "
              "the same view; the last column names each protocol field in which a row differs from your runs: "
              "rank against each other without care only rows that say \"same\".", ""]
    for key, rows in tables.items():
        cols = [k for k in BESIDE_COLUMNS if any(k in r.group.stats for r in rows)]
        cells = [[str(i), r.source, f"**{r.group.label}**" if r.differs is None else r.group.label,
                  *[r.group.stats[k].cell() if k in r.group.stats else "–" for k in cols],
                  "" if r.differs is None else "; ".join(r.differs) or "same"] for i, r in enumerate(rows, 1)]
        sources = sorted({r.source.split(": ")[0] for r in rows if r.differs is not None})
        lines += [f"### {table_title(key)}, beside {', '.join(sources)}", ""]
        lines += _md_table(["rank", "from", "variant", *(column_name(k, [r.group for r in rows]) for k in cols),
                            "protocol vs yours"], cells) + [""]
    return lines


ALL_SETTINGS = "all settings"


# The tables each tuned view shows: those its criterion was chosen for (every table in the untuned view).
VIEW_PANELS = {tuned_view("likelihood"): ("Likelihood", "Latent space"), tuned_view("samples"): ("Samples",)}


def selection_markdown(sweep: Sequence[Group], records: Sequence[dict]) -> list[str]:
    """The evidence of each selection: every setting of every swept study with its validation criteria over
    seeds, and the views that chose it."""
    if not sweep:
        return []
    chosen = {name: select(records, criterion) for name, criterion in CRITERIA.items()}
    lines = ["## Selection on the validation split", "",
             "Each variant's setting is chosen per budget on the validation split alone, by the mean over seeds "
             "of one criterion: " + "; ".join(f"**{name}**: `{c}` {_arrow(c)}" for name, c in CRITERIA.items())
             + ", compared on the seeds every eligible setting finished. A setting with a diverged or failed run is "
             "not chosen, and a budget that lacks one of the variant's settings is not decided. The test metrics "
             "of the chosen settings are the tuned tables below; `untuned` is the configured setting.", ""]
    tables: dict[tuple, list[Group]] = {}
    for g in sweep:
        tables.setdefault((g.study, g.dataset, g.budget), []).append(g)
    for (study, dataset, budget), table in tables.items():
        lines += [f"### {table_title((study, None, dataset, budget))}", ""]
        rows = []
        for g in table:
            cell = (g.study, g.dataset, g.variant, str(g.budget))
            picked = [name + (" (at the sweep's end)" if at_edge(records, cell, g.setting) else "")
                      for name in CRITERIA if chosen[name].get(cell) == g.setting]
            default = any(r.get("default_setting", True) and setting_label(r) == g.setting
                          and (r.get("study"), r.get("dataset"), r.get("variant"), str(r.get("budget"))) == cell
                          for r in records)
            undecided = [] if any(cell in chosen[name] for name in CRITERIA) else ["undecided: settings still to run"]
            rows.append([g.variant, g.setting or "–",
                         *[g.validation[c].cell() if c in g.validation else "–" for c in CRITERIA.values()],
                         str(g.n_diverged + g.n_failed), ", ".join(picked + (["untuned"] if default else []) + undecided)])
        lines += _md_table(["variant", "setting", *(f"validation {c} {_arrow(c)}" for c in CRITERIA.values()),
                            "diverged or failed", "chosen for"], rows) + [""]
    return lines


def rankings_markdown(groups: Sequence[Group]) -> list[str]:
    """Where a study has budgets or a sweep: each variant's rank by each ranking metric at every budget, tuned
    and untuned, and which pairs change places between consecutive budgets and between tuned and untuned."""
    lines = []
    for (study, dataset, metric), orders in ranking_orders(groups).items():
        if len(orders) < 2:
            continue
        columns = sorted(orders, key=lambda c: (budget_order(c[0]), c[1]))

        def place(v):  # rows in the order of the first column, then of the next where the first lacks a variant
            return [orders[c].index(v) if v in orders[c] else len(orders[c]) for c in columns], v

        variants = sorted({v for o in orders.values() for v in o}, key=place)
        lines += [f"### {study} / {dataset}: rank by {metric} {_arrow(metric)}", ""]
        header = [" ".join(x for x in (f"{b} epochs" if b is not None else "", w) if x) for b, w in columns]
        rows = [[v, *[str(orders[c].index(v) + 1) if v in orders[c] else "–" for c in columns]] for v in variants]
        lines += _md_table(["variant", *header], rows) + [""]
        for which in ("tuned", "untuned", ""):
            cols = [c for c in columns if c[1] == which]
            for a, b in zip(cols, cols[1:]):
                swaps = changed_places(orders[a], orders[b])
                lines.append(f"- {which + ', ' if which else ''}{a[0]} → {b[0]} epochs: "
                             + (f"{len(swaps)} pair(s) change places: {', '.join(swaps)}" if swaps else "same order"))
        for budget in sorted({c[0] for c in columns}, key=budget_order):
            if (budget, "tuned") in orders and (budget, "untuned") in orders:
                swaps = changed_places(orders[(budget, "untuned")], orders[(budget, "tuned")])
                lines.append(f"- untuned → tuned{f' at {budget} epochs' if budget is not None else ''}: "
                             + (f"{len(swaps)} pair(s) change places: {', '.join(swaps)}" if swaps else "same order"))
        lines.append("")
    return (["## Rankings across budgets and tuning", "",
             "Ranks by the mean over seeds (the tables' CIs say which differences are resolved).", ""] + lines
            if lines else [])


def write_csv(groups: Sequence[Group], path: str | Path) -> Path:
    """Long format: one row per (study, dataset, variant, metric) of each view, budget and setting (test
    metrics; the validation criteria as ``val/<key>``); NaN written as an empty cell."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["study", "dataset", "variant", "metric", "mean", "std", "ci95", "n", "view", "budget", "setting"])
    for g in groups:
        for name, s in [*g.stats.items(), *((f"val/{k}", v) for k, v in g.validation.items())]:
            w.writerow([g.study, g.dataset, g.variant, name,
                        *["" if math.isnan(v) else repr(v) for v in (s.mean, s.std, s.ci95)], s.n,
                        g.view or "", "" if g.budget is None else g.budget, g.setting])
    atomic_write(Path(path), out.getvalue())
    return Path(path)


def write_paired_csv(rows: Sequence[PairedRow], path: str | Path) -> Path:
    """One row per (study, dataset, variant, metric): the paired difference to the reference; NaN empty."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["study", "dataset", "variant", "reference", "metric", "mean", "std", "ci95", "n", "n_sign",
                "seeds", "view", "budget"])
    for r in rows:
        d = r.diff
        w.writerow([r.study, r.dataset, r.variant, r.reference, r.metric,
                    *["" if math.isnan(v) else repr(v) for v in (d.mean, d.std, d.ci95)], d.n, d.n_sign,
                    " ".join(map(str, d.seeds)), r.view or "", "" if r.budget is None else r.budget])
    atomic_write(Path(path), out.getvalue())
    return Path(path)
