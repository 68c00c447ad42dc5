"""The leaderboard's numbers, from the run records: each metric over seeds (``Stat``) per (study, dataset,
variant, setting, budget) (``Group``), the tables those groups form and their ranking, each variant's
difference to a reference variant paired by seed, a user's rows ranked with another folder's, and the order
of the variants at each budget.

Cells are ``mean ± h (n)`` over seeds, h the 95% Student-t half-width t_{0.975, n-1} s / sqrt(n) with s the
sample standard deviation (ddof = 1); h is undefined ("n/a") for one seed. A paired difference is
``mean ± h (k/n)``: the same statistics over the n per-seed differences, and k the seeds whose difference has
the sign of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from benchmark.metrics import keys as K
from benchmark.selection import UNTUNED, setting_label, tuned_view


# The tables of each (study, dataset), each ranked by its own metric, named in its heading. A table's ranking
# metric is the first family any of its variants reports; within a family the first key a variant has (the
# post-hoc ELBO, one posterior family for every decoder; in older records the encoder's ELBO, or for
# deterministic encoders, whose ELBO is -inf, their ex-post ELBO). Samples rank by KID of prior samples: in
# results/extractor_check_mnist.md it grows with every corruption and every class removed, as FID does, but is
# unbiased (real against real reads 0 whatever the set size), while precision is not monotone and blind to
# missing classes; FID ranks only records that lack KID, and the heading then says so.
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
        key = (str(r.get("study")), r.get("view") or "", str(r.get("dataset")), budget_order(r.get("budget")),
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
        names = metrics or sorted({k for r in finished for k in record_metrics(r)}, key=metric_order)
        for name in names:
            stat = summarize(record_metrics(r).get(name) for r in finished)
            if stat is not None:
                g.stats[name] = stat
        for name in sorted({k for r in finished for k in r.get("validation") or {}}, key=metric_order):
            stat = summarize((r.get("validation") or {}).get(name) for r in finished)
            if stat is not None:
                g.validation[name] = stat
        groups.append(g)
    return groups


def budget_order(budget):
    return (0, budget) if isinstance(budget, int) else (-1, None)


def _seed_order(r):
    seed = r.get("seed")
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def metric_order(name: str):
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


def in_rank_order(groups: Sequence[Group]) -> list[Group]:
    return [g for table in tables_of(groups).values() for g in table]


def tables_of(groups: Sequence[Group]) -> dict[tuple, list[Group]]:
    """The ranked groups of each table, by ``Group.table``."""
    tables: dict[tuple, list[Group]] = {}
    for g in groups:
        tables.setdefault(g.table, []).append(g)
    return {k: rank(v) for k, v in tables.items()}


def table_title(table: tuple) -> str:
    """A table's heading: ``study / dataset[ / N epochs][ — view]``."""
    study, view, dataset, budget = table
    return f"{study} / {dataset}" + (f" / {budget} epochs" if budget is not None else "") + (
        f" — {view}" if view else "")


# The posterior each ELBO key is of, named in its column (the same number was unmarked for deterministic
# encoders in older records, where ``elbo`` and ``elbo_expost`` coincided).
POSTERIOR_OF = {K.ELBO: "encoder's q", K.ELBO_BPD: "encoder's q", K.DISTORTION: "encoder's q",
                K.ELBO_POSTHOC: "post-hoc q", K.ELBO_POSTHOC_BPD: "post-hoc q", K.DISTORTION_POSTHOC: "post-hoc q",
                K.ELBO_EXPOST: "ex-post q"}


def column_name(name: str, table: Sequence[Group] = ()) -> str:
    """A column's name, what it is of (the posterior of an ELBO, the K of ``nll_iw`` where the table's runs
    share one), and its direction."""
    note = POSTERIOR_OF.get(name)
    if name in (K.NLL_IW, K.NLL_IW_BPD):
        ks = {str(g.protocol.get("iw_samples")) for g in table if g.protocol.get("iw_samples") is not None}
        note = f"K={ks.pop()}" if len(ks) == 1 else None
    label = f"{name} ({note})" if note else name
    return label + {True: " ↑", False: " ↓"}.get(K.HIGHER_IS_BETTER.get(name), "")


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
        for name in sorted(set(by_metric) & set(refs[0]), key=metric_order):
            diff = paired_difference(by_metric[name], refs[0][name])
            if diff is not None:
                rows.append(PairedRow(study, dataset, f"{variant} ({setting})" if setting else variant, reference,
                                      name, diff, view, budget))
    return rows


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
    for key, table in tables_of(groups).items():
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


def canonical(v):
    if isinstance(v, (list, tuple)):
        return [canonical(x) for x in v]
    return v.lower() if isinstance(v, str) else v


def _differs(mine: dict, theirs: dict) -> list[str]:
    out = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if name in PROTOCOL_OWN or MIXED in (a, b) or a is None or b is None:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. the FID extractor's metadata: name the keys
            keys = sorted(k for k in set(a) | set(b) if canonical(a.get(k)) != canonical(b.get(k)))
            if keys:
                out.append(f"{name} in {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else ""))
        elif canonical(a) != canonical(b):
            out.append(f"{name} {b} vs {a}")
    return out


# The ranking metric of each criterion's tables, and the view tuned for it.
RANKINGS = (("Likelihood", K.NLL_IW, "likelihood"), ("Samples", K.KID_PRIOR, "samples"))


def ranking_orders(groups: Sequence[Group]) -> dict[tuple, dict[tuple, list[str]]]:
    """(study, dataset, metric) -> {(budget, tuned or untuned): variants best first by the mean}, for the
    tables ranked by ``RANKINGS``' metrics."""
    out: dict[tuple, dict[tuple, list[str]]] = {}
    for key, table in tables_of(groups).items():
        study, view, dataset, budget = key
        for title, metric, name in RANKINGS:
            which = {tuned_view(name): "tuned", UNTUNED: "untuned", None: ""}.get(view)
            ranked = [g.variant for g in rank(table, title) if metric in g.stats]
            if which is not None and ranked:
                out.setdefault((study, dataset, metric), {})[(budget, which)] = ranked
    return out


def changed_places(before: list[str], after: list[str]) -> list[str]:
    """The pairs of variants in both orders whose order differs."""
    common = [v for v in before if v in after]
    return [f"{a}/{b}" for i, a in enumerate(common) for b in common[i + 1:] if after.index(a) > after.index(b)]
