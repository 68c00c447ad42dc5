"""The leaderboard, computed from the run records: tables over seeds, paired differences to a reference
variant, the comparison with published values, a user's rows beside another folder's, CSV and plots.

    latent-bench leaderboard [RESULTS_DIR] [--references FILE] [--reference-variant VARIANT] [--beside FOLDER]

Cells are ``mean ± h (n)`` over seeds, h the 95% Student-t half-width t_{0.975, n-1} s / sqrt(n) with s the
sample standard deviation (ddof = 1); h is undefined ("n/a") for one seed. A second section (and
``leaderboard_paired.csv``) gives each variant's difference to a reference variant (default vae) paired by
seed, ``mean ± h (k/n)``: the same statistics over the n per-seed differences, and k the seeds whose
difference has the sign of the mean.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from benchmark.errors import UsageError
from benchmark.metrics import keys as K
from benchmark.records import atomic_write, load_records
from benchmark.selection import CRITERIA, UNTUNED, at_edge, is_swept, select, setting_label, tuned_view, views

# The tables of each (study, dataset), each ranked by its own metric, named in its heading. A table's ranking
# metric is the first family any of its variants reports; within a family the first key a variant has (the
# post-hoc ELBO, one posterior family for every decoder; in older records the encoder's ELBO, or for
# deterministic encoders, whose ELBO is -inf, their ex-post ELBO). Samples rank by KID of prior samples: in results/extractor_check_mnist.md it grows
# with every corruption and every class removed, as FID does, but is unbiased (real against real reads 0
# whatever the set size), while precision is not monotone and blind to missing classes; FID ranks only
# records that lack KID, and the heading then says so.
PRIMARY = {"Likelihood": ((K.NLL_IW,), (K.ELBO_POSTHOC, K.ELBO, K.ELBO_EXPOST)),
           "Samples": ((K.KID_PRIOR,), (K.FID_PRIOR,))}
HEADLINE = {"Likelihood": (K.NLL_IW, K.NLL_IW_BPD, K.ELBO_POSTHOC, K.ELBO_POSTHOC_BPD, K.ELBO, K.ELBO_BPD,
                           K.ELBO_EXPOST, K.DISTORTION_POSTHOC, K.RATE_POSTHOC, K.DISTORTION, K.RATE),
            "Samples": (K.KID_PRIOR, K.PRECISION_PRIOR, K.RECALL_PRIOR, K.FID_PRIOR,
                        K.KID_GMM, K.PRECISION_GMM, K.RECALL_GMM, K.FID_GMM,
                        K.KID_RECON, K.PRECISION_RECON, K.RECALL_RECON, K.FID_RECON)}
HEADLINE_KEYS = tuple(k for cols in HEADLINE.values() for k in cols)
GAUSSIANITY_PANEL = (K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.PRIOR_HOLES, K.KS_FRAC)
LOG_SCALE = {K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL}  # log axis when positive and over a decade
MIXED = "<differs between seeds>"


# ----------------------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, standard deviation (ddof=1), 95% Student-t half-width, number of seeds."""
    mean: float
    std: float
    ci95: float
    n: int

    def cell(self) -> str:
        ci = "n/a" if math.isnan(self.ci95) else f"{self.ci95:.3g}"
        return f"{self.mean:.4g} ± {ci} ({self.n})"


def summarize(values: Iterable) -> Stat | None:
    """Stat of the finite numbers in ``values`` (None, NaN and ±inf are left out); None if there are none."""
    from scipy import stats

    x = [float(v) for v in values
         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    n = len(x)
    if n == 0:
        return None
    mean = math.fsum(x) / n
    if n == 1:
        return Stat(mean, math.nan, math.nan, 1)
    if min(x) == max(x):  # exact: rounding in the mean would otherwise leave a ~1e-17 spread
        return Stat(x[0], 0.0, 0.0, n)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    return Stat(mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), n)


@dataclass
class Group:
    """The runs of one variant on one dataset in one study. ``stats`` cover finished runs only."""
    study: str
    dataset: str
    variant: str
    stats: dict[str, Stat] = field(default_factory=dict)
    seeds: list = field(default_factory=list)
    n_diverged: int = 0
    n_failed: int = 0
    n_running: int = 0
    protocol: dict = field(default_factory=dict)  # shared by its finished runs (MIXED where they differ)
    samples: str | None = None  # the sample grid of the finished run with the smallest seed
    latent_map: str | None = None  # that run's latent-plane figure (2-D latents only)
    view: str | None = None     # the selection view (``benchmark.selection``) of a swept study
    budget: int | None = None   # the study's budget (epochs) of a budget ladder
    setting: str = ""           # the swept keys' values, e.g. "weight=10"
    validation: dict[str, Stat] = field(default_factory=dict)  # the selection criteria over seeds

    @property
    def table(self) -> tuple:
        """The table the group is a row of: (study, view, dataset, budget)."""
        return self.study, self.view, self.dataset, self.budget

    @property
    def label(self) -> str:
        return f"{self.variant} ({self.setting})" if self.setting else self.variant


def record_metrics(record: dict) -> dict:
    """A record's metrics as the tables read them. Records written before the post-hoc posterior held, for a
    deterministic encoder, the ex-post posterior's ELBO, distortion and rate under the encoder's keys too
    (``elbo`` = ``elbo_expost``): those three are left out, so no column calls them the encoder's."""
    metrics = record.get("metrics") or {}
    if K.ELBO_EXPOST in metrics:
        return {k: v for k, v in metrics.items() if k not in (K.ELBO, K.DISTORTION, K.RATE)}
    return metrics


def aggregate(records: Iterable[dict], metrics: Sequence[str] | None = None) -> list[Group]:
    """Group records by (study, view, dataset, budget, variant, setting) and summarise each metric over the
    finished seeds.

    Diverged and failed runs are counted, never averaged; running ones are counted apart. ``metrics``
    restricts the summary to those keys (default: every key a finished record reports).
    """
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        key = (str(r.get("study")), r.get("view") or "", str(r.get("dataset")), _budget_order(r.get("budget")),
               str(r.get("variant")), setting_label(r))
        by_key.setdefault(key, []).append(r)
    groups = []
    for (study, view, dataset, budget, variant, setting), rs in sorted(by_key.items()):
        finished = sorted((r for r in rs if r.get("status") == "finished"), key=_seed_order)
        g = Group(study, dataset, variant, view=view or None, budget=budget[1], setting=setting,
                  seeds=[r.get("seed") for r in finished],
                  n_diverged=sum(r.get("status") == "diverged" for r in rs),
                  n_failed=sum(r.get("status") == "failed" for r in rs),
                  n_running=sum(r.get("status") == "running" for r in rs),
                  protocol=_common([r.get("protocol") or {} for r in finished]),
                  samples=next((r["samples"] for r in finished if r.get("samples")), None),
                  latent_map=next((r["latent_map"] for r in finished if r.get("latent_map")), None))
        names = metrics or sorted({k for r in finished for k in record_metrics(r)}, key=_metric_order)
        for name in names:
            stat = summarize(record_metrics(r).get(name) for r in finished)
            if stat is not None:
                g.stats[name] = stat
        for name in sorted({k for r in finished for k in r.get("validation") or {}}, key=_metric_order):
            stat = summarize((r.get("validation") or {}).get(name) for r in finished)
            if stat is not None:
                g.validation[name] = stat
        groups.append(g)
    return groups


def _budget_order(budget):
    return (0, budget) if isinstance(budget, int) else (-1, None)


def _seed_order(r):
    seed = r.get("seed")
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _metric_order(name: str):
    order = list(K.HIGHER_IS_BETTER)
    return (order.index(name), "") if name in order else (len(order), name)


def _common(protocols: list[dict]) -> dict:
    out = {}
    for name in sorted({k for p in protocols for k in p}):
        values = [p.get(name) for p in protocols]
        out[name] = values[0] if all(v == values[0] for v in values) else MIXED
    return out


def primary_keys(groups: Sequence[Group], table: str = "Likelihood") -> tuple[str, ...] | None:
    """The ranking family of ``table`` (see ``PRIMARY``): the first that any of its groups reports."""
    return next((fam for fam in PRIMARY[table] if any(k in g.stats for g in groups for k in fam)), None)


def rank(groups: Sequence[Group], table: str = "Likelihood") -> list[Group]:
    """Groups best first by ``table``'s ranking metric in its direction; groups without it go last."""
    family = primary_keys(groups, table)
    if family is None:
        return list(groups)
    sign = -1.0 if K.HIGHER_IS_BETTER.get(family[0]) else 1.0

    def key(g):
        stat = next((g.stats[k] for k in family if k in g.stats), None)
        return (stat is None, sign * stat.mean if stat else 0.0, g.variant)

    return sorted(groups, key=key)


def _ranked(groups: Sequence[Group]) -> list[Group]:
    return [g for table in _tables(groups).values() for g in table]


def _tables(groups: Sequence[Group]) -> dict[tuple, list[Group]]:
    """The ranked groups of each table, by ``Group.table``."""
    tables: dict[tuple, list[Group]] = {}
    for g in groups:
        tables.setdefault(g.table, []).append(g)
    return {k: rank(v) for k, v in tables.items()}


def _title(table: tuple) -> str:
    """A table's heading: ``study / dataset[ / N epochs][ — view]``."""
    study, view, dataset, budget = table
    return f"{study} / {dataset}" + (f" / {budget} epochs" if budget is not None else "") + (
        f" — {view}" if view else "")


# ----------------------------------------------------------------------------------------------------------------
# Paired differences to a reference variant
# ----------------------------------------------------------------------------------------------------------------

REFERENCE_VARIANT = "vae"


@dataclass(frozen=True)
class PairedDiff:
    """variant - reference over the seeds both finished with a finite value: the mean difference, its sd
    (ddof=1) and 95% Student-t half-width over those n seeds, and ``n_sign``, the seeds whose difference
    has the sign of the mean. Pairing by seed removes what a seed does to both (the data split, the
    evaluation's samples), so a lead that the unpaired CIs of two cells hide shows here."""
    mean: float
    std: float
    ci95: float
    n: int
    n_sign: int
    seeds: tuple = ()

    def cell(self) -> str:
        ci = "n/a" if math.isnan(self.ci95) else f"{self.ci95:.2g}"
        return f"{self.mean:+.3g} ± {ci} ({self.n_sign}/{self.n})"


def paired_difference(values: dict, reference: dict) -> PairedDiff | None:
    """``values`` and ``reference`` map seed -> metric value. Seeds in only one of them, and non-finite or
    missing values, are left out; None when no seed is left. One seed: the CI is nan ("n/a")."""
    def finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    seeds = sorted((s for s in values if s in reference and finite(values[s]) and finite(reference[s])),
                   key=lambda s: _seed_order({"seed": s}))
    diffs = [float(values[s]) - float(reference[s]) for s in seeds]
    stat = summarize(diffs)
    if stat is None:
        return None
    sign = (stat.mean > 0) - (stat.mean < 0)
    n_sign = sum(((d > 0) - (d < 0)) == sign for d in diffs)
    return PairedDiff(stat.mean, stat.std, stat.ci95, stat.n, n_sign, tuple(seeds))


@dataclass
class PairedRow:
    study: str
    dataset: str
    variant: str
    reference: str
    metric: str
    diff: PairedDiff
    view: str | None = None
    budget: int | None = None

    @property
    def table(self) -> tuple:
        return self.study, self.view, self.dataset, self.budget


def paired_differences(records: Iterable[dict], reference: str = REFERENCE_VARIANT) -> list[PairedRow]:
    """For every table (study, view, dataset, budget) with finished ``reference`` runs, every other variant
    and every metric key that both report: the paired-by-seed difference variant - reference
    (``paired_difference``). A view has one setting per variant; records without a view, more than one
    setting of a variant would share its seeds, so those are told apart by their setting."""
    values: dict[tuple, dict] = {}  # (table, variant, setting) -> {metric: {seed: value}}
    for r in records:
        if r.get("status") != "finished":
            continue
        table = (str(r.get("study")), r.get("view"), str(r.get("dataset")), r.get("budget"))
        by_metric = values.setdefault((table, str(r.get("variant")), setting_label(r)), {})
        for name, v in record_metrics(r).items():
            by_metric.setdefault(name, {})[r.get("seed")] = v
    rows = []
    for (table, variant, setting), by_metric in sorted(values.items(), key=lambda kv: str(kv[0])):
        refs = [v for (t, var, _), v in values.items() if t == table and var == reference]
        if variant == reference or len(refs) != 1:
            continue
        study, view, dataset, budget = table
        for name in sorted(set(by_metric) & set(refs[0]), key=_metric_order):
            diff = paired_difference(by_metric[name], refs[0][name])
            if diff is not None:
                rows.append(PairedRow(study, dataset, f"{variant} ({setting})" if setting else variant, reference,
                                      name, diff, view, budget))
    return rows


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
    order = {key: [g.label for g in table] for key, table in _tables(groups).items()}
    tables: dict[tuple, dict[str, dict[str, PairedDiff]]] = {}
    for row in rows:
        tables.setdefault(row.table, {}).setdefault(row.variant, {})[row.metric] = row.diff
    for key, by_variant in tables.items():
        ranked = order.get(key, [])
        variants = sorted(by_variant, key=lambda v: (ranked.index(v) if v in ranked else len(ranked), v))
        present = sorted({k for cells in by_variant.values() for k in cells
                          if K.HIGHER_IS_BETTER.get(k, False) is not None}, key=_metric_order)
        if not present:
            continue
        lines += [f"### {_title(key)}", ""]
        for title, cols in (("", [k for k in HEADLINE_KEYS if k in present]),
                            ("Other metrics", [k for k in present if k not in HEADLINE_KEYS])):
            if not cols:
                continue
            if title:
                lines += [f"{title}:", ""]
            cells = [[v, *[by_variant[v][k].cell() if k in by_variant[v] else "–" for k in cols]]
                     for v in variants]
            lines += _md_table(["variant", *map(_header, cols)], cells) + [""]
    return lines


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


# ----------------------------------------------------------------------------------------------------------------
# Published values
# ----------------------------------------------------------------------------------------------------------------

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
        elif _canonical(measured[name]) != _canonical(want):
            out.append(f"{name} {measured[name]} vs reference {want}")
    return out


def _canonical(v):
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return v.lower() if isinstance(v, str) else v


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


# ----------------------------------------------------------------------------------------------------------------
# Outputs: markdown, CSV, plots
# ----------------------------------------------------------------------------------------------------------------

# The posterior each ELBO key is of, named in its column (the same number was unmarked for deterministic
# encoders in older records, where ``elbo`` and ``elbo_expost`` coincided).
POSTERIOR_OF = {K.ELBO: "encoder's q", K.ELBO_BPD: "encoder's q", K.DISTORTION: "encoder's q",
                K.ELBO_POSTHOC: "post-hoc q", K.ELBO_POSTHOC_BPD: "post-hoc q", K.DISTORTION_POSTHOC: "post-hoc q",
                K.ELBO_EXPOST: "ex-post q"}


def _header(name: str, table: Sequence[Group] = ()) -> str:
    """A column's name, what it is of (the posterior of an ELBO, the K of ``nll_iw`` where the table's runs
    share one), and its direction."""
    note = POSTERIOR_OF.get(name)
    if name in (K.NLL_IW, K.NLL_IW_BPD):
        ks = {str(g.protocol.get("iw_samples")) for g in table if g.protocol.get("iw_samples") is not None}
        note = f"K={ks.pop()}" if len(ks) == 1 else None
    label = f"{name} ({note})" if note else name
    return label + {True: " ↑", False: " ↓"}.get(K.HIGHER_IS_BETTER.get(name), "")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _number(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


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
    for key, table in _tables(groups).items():
        lines += [f"## {_title(key)}", "", _budget_line(table), ""]
        present = sorted({k for g in table for k in g.stats}, key=_metric_order)
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
                title += f", ranked by {_header(family[0], table)}" + (
                    f" ({', '.join(family[1:])} where it is missing)" if len(family) > 1 else "")
            elif title in PRIMARY:
                title += ", unranked (no variant reports its metric)"
            else:
                title += ", in the likelihood table's order"
            lines += [f"### {title}", ""]
            rows = [[str(i), g.label, *[g.stats[k].cell() if k in g.stats else "–" for k in cols],
                     str(g.n_diverged), str(g.n_failed)] for i, g in enumerate(ordered, 1)]
            lines += _md_table(["rank", "variant", *(_header(k, table) for k in cols), "diverged", "failed"],
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
        cells = [[r["study"] or "–", f"{r['label']} ({r['variant']})", r["dataset"], _header(r["metric"]),
                  r["measured"].cell() if r["measured"] else "–", _number(r["reference"]),
                  _number(r["difference"]), r["reference_id"], r["why"]] for r in rows]
        lines += _md_table(["study", "variant", "dataset", "metric", "measured", "reference", "difference",
                            "source", "note"], cells) + [""]
    for name in plots:
        lines += [f"![{Path(name).stem}]({name})", ""]
    return "\n".join(lines)


BESIDE_COLUMNS = (K.NLL_IW, K.NLL_IW_BPD, K.ELBO_POSTHOC, K.ELBO_POSTHOC_BPD, K.KID_PRIOR, K.FID_PRIOR)
# Fields of a run's protocol that are measurements of the run, not settings that two runs could share
PROTOCOL_OWN = {"iw_ks"}


@dataclass
class BesideRow:
    """A row of a table ranked with other folders' rows: where it comes from ("yours" or "<folder>: <study>"),
    and the protocol fields in which one of theirs differs from the user's runs (None for the user's)."""
    source: str
    group: Group
    differs: list[str] | None


def beside_tables(groups: Sequence[Group], beside: Sequence[tuple[str, Sequence[Group]]]) -> dict[tuple, list[BesideRow]]:
    """Each of the user's tables ranked again with the finished rows of other results folders (``(name,
    groups)``, e.g. the committed ``results``) on the same dataset and in the same view (an unswept table
    beside a swept study's untuned view); tables that no other folder has rows for are left out."""
    out = {}
    for key, table in _tables(groups).items():
        study, view, dataset, budget = key
        theirs = {id(g): name for name, gs in beside for g in gs if g.seeds and g.dataset == dataset
                  and (g.view == view or g.view is None or (view is None and g.view == UNTUNED))}
        if not theirs:
            continue
        mine = _common([g.protocol for g in table])
        pool = list(table) + [g for name, gs in beside for g in gs if id(g) in theirs]
        out[key] = [BesideRow("yours", g, None) if id(g) not in theirs else
                    BesideRow(f"{theirs[id(g)]}: {g.study}", g, _differs(mine, g.protocol)) for g in rank(pool)]
    return out


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
        lines += [f"### {_title(key)}, beside {', '.join(sources)}", ""]
        lines += _md_table(["rank", "from", "variant", *(_header(k, [r.group for r in rows]) for k in cols),
                            "protocol vs yours"], cells) + [""]
    return lines


def _differs(mine: dict, theirs: dict) -> list[str]:
    out = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if name in PROTOCOL_OWN or MIXED in (a, b) or a is None or b is None:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. the FID extractor's metadata: name the keys
            keys = sorted(k for k in set(a) | set(b) if _canonical(a.get(k)) != _canonical(b.get(k)))
            if keys:
                out.append(f"{name} in {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else ""))
        elif _canonical(a) != _canonical(b):
            out.append(f"{name} {b} vs {a}")
    return out


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
        lines += [f"### {_title((study, None, dataset, budget))}", ""]
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


# The ranking metric of each criterion's tables, and the view tuned for it.
RANKINGS = (("Likelihood", K.NLL_IW, "likelihood"), ("Samples", K.KID_PRIOR, "samples"))


def _orders(groups: Sequence[Group]) -> dict[tuple, dict[tuple, list[str]]]:
    """(study, dataset, metric) -> {(budget, tuned or untuned): variants best first by the mean}, for the
    tables ranked by ``RANKINGS``' metrics."""
    out: dict[tuple, dict[tuple, list[str]]] = {}
    for key, table in _tables(groups).items():
        study, view, dataset, budget = key
        for title, metric, name in RANKINGS:
            which = {tuned_view(name): "tuned", UNTUNED: "untuned", None: ""}.get(view)
            ranked = [g.variant for g in rank(table, title) if metric in g.stats]
            if which is not None and ranked:
                out.setdefault((study, dataset, metric), {})[(budget, which)] = ranked
    return out


def _swaps(before: list[str], after: list[str]) -> list[str]:
    """The pairs of variants in both orders whose order differs."""
    common = [v for v in before if v in after]
    return [f"{a}/{b}" for i, a in enumerate(common) for b in common[i + 1:] if after.index(a) > after.index(b)]


def rankings_markdown(groups: Sequence[Group]) -> list[str]:
    """Where a study has budgets or a sweep: each variant's rank by each ranking metric at every budget, tuned
    and untuned, and which pairs change places between consecutive budgets and between tuned and untuned."""
    lines = []
    for (study, dataset, metric), orders in _orders(groups).items():
        if len(orders) < 2:
            continue
        columns = sorted(orders, key=lambda c: (_budget_order(c[0]), c[1]))
        variants = sorted({v for o in orders.values() for v in o},
                          key=lambda v: min(o.index(v) if v in o else len(o) for o in orders.values()))
        lines += [f"### {study} / {dataset}: rank by {metric} {_arrow(metric)}", ""]
        header = [" ".join(x for x in (f"{b} epochs" if b is not None else "", w) if x) for b, w in columns]
        rows = [[v, *[str(orders[c].index(v) + 1) if v in orders[c] else "–" for c in columns]] for v in variants]
        lines += _md_table(["variant", *header], rows) + [""]
        for which in ("tuned", "untuned", ""):
            cols = [c for c in columns if c[1] == which]
            for a, b in zip(cols, cols[1:]):
                swaps = _swaps(orders[a], orders[b])
                lines.append(f"- {which + ', ' if which else ''}{a[0]} → {b[0]} epochs: "
                             + (f"{len(swaps)} pair(s) change places: {', '.join(swaps)}" if swaps else "same order"))
        for budget in sorted({c[0] for c in columns}, key=_budget_order):
            if (budget, "tuned") in orders and (budget, "untuned") in orders:
                swaps = _swaps(orders[(budget, "untuned")], orders[(budget, "tuned")])
                lines.append(f"- untuned → tuned{f' at {budget} epochs' if budget is not None else ''}: "
                             + (f"{len(swaps)} pair(s) change places: {', '.join(swaps)}" if swaps else "same order"))
        lines.append("")
    return (["## Rankings across budgets and tuning", "",
             "Ranks by the mean over seeds (the tables' CIs say which differences are resolved).", ""] + lines
            if lines else [])


def plot_budgets(groups: Sequence[Group], path: str | Path) -> Path | None:
    """Each ranking metric against the budget, one line per variant (its tuned setting where the study
    sweeps), 95% CI bars; one row of panels per (study, dataset). None without two budgets."""
    from matplotlib.figure import Figure

    series: dict[tuple, dict[str, list[tuple]]] = {}  # (study, dataset, metric) -> variant -> [(budget, stat)]
    for g in groups:
        for _, metric, name in RANKINGS:
            if g.budget is not None and metric in g.stats and g.view in (None, tuned_view(name)):
                series.setdefault((g.study, g.dataset, metric), {}).setdefault(g.variant, []).append(
                    (g.budget, g.stats[metric]))
    series = {k: v for k, v in series.items() if len({b for pts in v.values() for b, _ in pts}) > 1}
    if not series:
        return None
    colours = _colours(groups)
    tuned = {metric: name for _, metric, name in RANKINGS}
    swept = any(g.view for g in groups)
    fig = Figure(figsize=(6 * len(series), 4.5), constrained_layout=True)
    for ax, ((study, dataset, metric), by_variant) in zip(fig.subplots(1, len(series), squeeze=False)[0],
                                                          series.items()):
        for variant, pts in sorted(by_variant.items()):
            pts.sort(key=lambda p: p[0])
            ax.errorbar([b for b, _ in pts], [st.mean for _, st in pts], yerr=[_errorbar(st) for _, st in pts],
                        marker="o", capsize=3, label=variant, color=colours[variant])
        title = f"{study} / {dataset}" + (f"\n{tuned_view(tuned[metric])}" if swept else "")
        ax.set(title=title, xlabel="budget (epochs)", ylabel=f"{_header(metric)}")
        ax.set_xticks(sorted({b for pts in by_variant.values() for b, _ in pts}))
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, Path(path))


def _arrow(name: str) -> str:
    return {True: "↑", False: "↓"}.get(K.HIGHER_IS_BETTER.get(name), "")


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


def _label(g: Group, groups: Sequence[Group]) -> str:
    """The group's name in a figure of ``groups`` (one study): its variant and setting, and of its dataset,
    budget and view what the figure's groups do not share."""
    parts = [g.label]
    for part, value in (("dataset", g.dataset), ("budget", f"{g.budget} ep"), ("view", g.view)):
        if len({getattr(x, part) for x in groups}) > 1 and value:
            parts.append(value)
    return " · ".join(parts)


def _colours(groups: Sequence[Group]) -> dict[str, tuple]:
    """One colour per variant, the same in every panel (tab10, then tab20's lighter shades)."""
    from matplotlib import colormaps

    names = sorted({g.variant for g in groups})
    palette = [*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2]]
    return {v: palette[i % len(palette)] for i, v in enumerate(names)}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _errorbar(stat: Stat) -> float:
    return 0.0 if math.isnan(stat.ci95) else stat.ci95


def plot_fid_vs_elbo(groups: Sequence[Group], path: str | Path) -> Path | None:
    """The sample table's ranking metric of prior samples (KID; FID in older records) against the ELBO (the
    post-hoc one; in older records the encoder's, hollow where it is the ex-post one), one panel per (study,
    dataset), 95% CI bars. None if no group has both."""
    from matplotlib.figure import Figure

    panels = {}
    for key, table in _tables(groups).items():
        family = primary_keys(table, "Samples") or ()
        sample_key = next((k for k in family if any(k in g.stats for g in table)), None)
        pts = []
        for g in table:
            elbo_key = next((k for k in (K.ELBO_POSTHOC, K.ELBO, K.ELBO_EXPOST) if k in g.stats), None)
            if sample_key in g.stats and elbo_key:
                pts.append((g, elbo_key))
        if pts:
            panels[key] = sample_key, pts
    if not panels:
        return None
    colours = _colours(groups)
    markers = "osD^vP*Xhp<>"
    fig = Figure(figsize=(5.5 * len(panels) + 2.5, 4.5), constrained_layout=True)
    for ax, (key, (sample_key, pts)) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for i, (g, elbo_key) in enumerate(pts):
            x, y = g.stats[elbo_key], g.stats[sample_key]
            colour = colours[g.variant]
            ax.errorbar(x.mean, y.mean, xerr=_errorbar(x), yerr=_errorbar(y), fmt=markers[i % len(markers)],
                        capsize=3, color=colour, mec=colour, ms=7, label=g.label,
                        mfc="none" if elbo_key == K.ELBO_EXPOST else colour)  # hollow: the ex-post ELBO
        posthoc = any(elbo_key == K.ELBO_POSTHOC for _, elbo_key in pts)
        xlabel = "ELBO of the post-hoc posterior (nats) →" if posthoc else \
            "ELBO (nats; the encoder's; hollow: ex-post) →"
        ax.set(title=_title(key), xlabel=xlabel, ylabel=f"{_header(sample_key)} of prior samples")
        ys = [g.stats[sample_key].mean for g, _ in pts]
        if min(ys) > 0 and max(ys) >= 10 * min(ys):
            ax.set_yscale("log")  # a collapsed model's samples would squash the others into a corner
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, Path(path))


def plot_gaussianity(groups: Sequence[Group], path: str | Path) -> Path | None:
    """One panel per latent-Gaussianity metric, one point per group with its 95% CI; None if none is
    recorded."""
    from matplotlib.figure import Figure

    groups = _ranked(groups)
    names = [k for k in GAUSSIANITY_PANEL if any(k in g.stats for g in groups)]
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(5 * cols, 0.3 * len(groups) * rows + 2 * rows), constrained_layout=True)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        gs = [g for g in groups if name in g.stats]
        means = [g.stats[name].mean for g in gs]
        ax.errorbar(means, range(len(gs)), xerr=[_errorbar(g.stats[name]) for g in gs], fmt="o", capsize=2)
        ax.set_yticks(range(len(gs)), [_label(g, groups) for g in gs])
        ax.set_ylim(len(gs) - 0.5, -0.5)  # best-ranked variant on top
        if name in LOG_SCALE and min(means) > 0 and max(means) >= 10 * min(means):
            ax.set_xscale("log")
        ax.set_title(_header(name))
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(" / ".join(sorted({_title(g.table) for g in groups})))
    return _save(fig, Path(path))


def plot_samples(groups: Sequence[Group], results_dir: str | Path, path: str | Path) -> Path | None:
    """The prior-sample grid of each group's first seed side by side; None if no grid file exists."""
    found = []
    for g in [g for table in _tables(groups).values() for g in rank(table, "Samples")]:
        # A grid path is relative to its record's folder (runs/<study>/) or to RESULTS_DIR.
        candidates = [Path(results_dir) / "runs" / g.study / g.samples, Path(results_dir) / g.samples] \
            if g.samples else []
        png = next((p for p in candidates if p.is_file()), None)
        if png is not None:
            found.append((g, png))
    return _tiles(found, path, cols=4, size=(3, 3.3), fontsize=9)


def _tiles(found: Sequence[tuple[Group, Path]], path: str | Path, cols: int, size: tuple[float, float],
           fontsize: int) -> Path | None:
    """The PNG of each group as one tile titled with its label, ``cols`` to a row; None without any."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    if not found:
        return None
    import textwrap

    cols = min(cols, len(found))
    rows = math.ceil(len(found) / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), constrained_layout=True)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (g, png) in zip(axes, found):
        ax.imshow(imread(png), cmap="gray")
        ax.set_title(textwrap.fill(_label(g, [g for g, _ in found]), 30), fontsize=fontsize)
    for ax in axes:
        ax.axis("off")
    return _save(fig, Path(path))


def plot_latent_maps(groups: Sequence[Group], results_dir: str | Path, path: str | Path) -> Path | None:
    """The latent-plane figure (``benchmark.latent_map``) of each group's first seed, one tile per group;
    None if no group has one (only runs with two latent dimensions draw it). A figure's path is relative to
    its record's folder, runs/<study>/."""
    found = [(g, Path(results_dir) / "runs" / g.study / g.latent_map) for g in _ranked(groups) if g.latent_map]
    return _tiles([(g, png) for g, png in found if png.is_file()], path, cols=2, size=(8, 3.9), fontsize=11)


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
    sweep = aggregate({**r, "view": ALL_SETTINGS} for r in records) if is_swept(records) else []
    plots = _write_plots(groups, root)
    write_csv(groups + sweep, root / "leaderboard.csv")
    write_paired_csv(paired, root / "leaderboard_paired.csv")
    md = root / "leaderboard.md"
    atomic_write(md, leaderboard_markdown(groups, refs, plots, n_records=len(records), paired=paired,
                                           selection=selection_markdown(sweep, records),
                                           beside=beside_markdown(groups, others) if others else ()))
    return md


PLOTS = {  # file stem: (the view whose groups it shows in a swept study, the plot)
    "fid_vs_elbo": ("likelihood", lambda gs, root, p: plot_fid_vs_elbo(gs, p)),
    "gaussianity": ("likelihood", lambda gs, root, p: plot_gaussianity(gs, p)),
    "samples": ("samples", plot_samples),
    "latent_2d": ("likelihood", plot_latent_maps),
    "budgets": (None, lambda gs, root, p: plot_budgets(gs, p)),
}


def _write_plots(groups: Sequence[Group], root: Path) -> list[str]:
    """Each plot, one figure per study (``<stem>.png`` when the folder holds one study, else
    ``<stem>_<study>.png``); a swept study's figure shows the view tuned for its metric. A plot file left from
    records that are gone is removed. Returns the names written."""
    studies = sorted({g.study for g in groups})
    written = []
    for stem, (tuned_for, make) in PLOTS.items():
        for study in studies:
            gs = [g for g in groups if g.study == study]
            if tuned_for and any(g.view for g in gs):
                gs = [g for g in gs if g.view == tuned_view(tuned_for)]
            name = f"{stem}.png" if len(studies) == 1 else f"{stem}_{study}.png"
            if gs and make(gs, root, root / name):
                written.append(name)
        for old in [root / f"{stem}.png", *root.glob(f"{stem}_*.png")]:
            if old.name not in written:
                old.unlink(missing_ok=True)  # never leave a plot of records that are gone
    return written


def _paired_to(records: Sequence[dict], reference_variant: str) -> list[PairedRow]:
    """The paired differences; a reference variant that no record has is a usage error unless it is the
    default (a study without a VAE then simply has no paired section)."""
    known = sorted({str(r.get("variant")) for r in records})
    if reference_variant not in known and reference_variant != REFERENCE_VARIANT:
        raise UsageError(f"--reference-variant {reference_variant}: no record has that variant; choose one of "
                         f"{known}")
    return paired_differences(records, reference_variant)
