"""The leaderboard's figures, drawn from the groups of ``benchmark.leaderboard.tables``: sample quality
against the ELBO, the latent-Gaussianity panel, prior-sample grids, latent-plane maps, and each ranking metric
against the budget. Matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from benchmark.metrics import keys as K
from benchmark.leaderboard.tables import (GAUSSIANITY_PANEL, LOG_SCALE, RANKINGS, Group, Stat, column_name,
                                          in_rank_order, primary_keys, rank, table_title, tables_of)
from benchmark.selection import tuned_view


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


def _limits(stats: Sequence[Stat]) -> tuple[float, float]:
    """An axis range over every mean ± CI of ``stats``, with 8 % to spare at either end."""
    low = min(st.mean - _errorbar(st) for st in stats)
    high = max(st.mean + _errorbar(st) for st in stats)
    return low - 0.08 * (high - low), high + 0.08 * (high - low)


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
    fig = Figure(figsize=(7.5 * len(series), 4.5), constrained_layout=True)
    for ax, ((study, dataset, metric), by_variant) in zip(fig.subplots(1, len(series), squeeze=False)[0],
                                                          series.items()):
        means = {v: [st.mean for _, st in pts if math.isfinite(st.mean)] for v, pts in by_variant.items()}
        far = off_scale({v: m for v, m in means.items() if m})
        budgets = sorted({b for pts in by_variant.values() for b, _ in pts})
        dodge = 0.01 * (budgets[-1] - budgets[0])  # side by side at each budget, so that the CI bars show
        for i, (variant, pts) in enumerate(sorted(by_variant.items())):
            pts.sort(key=lambda p: p[0])
            label = variant + (f" (off scale: {', '.join(f'{m:.3g}' for m in means[variant])})"
                               if variant in far else "")
            shift = (i - (len(by_variant) - 1) / 2) * dodge
            ax.errorbar([b + shift for b, _ in pts], [st.mean for _, st in pts],
                        yerr=[_errorbar(st) for _, st in pts], marker="o", capsize=3, label=label,
                        color=colours[variant])
        kept = [st for v, pts in by_variant.items() if v not in far for _, st in pts if math.isfinite(st.mean)]
        if far and kept:
            ax.set_ylim(*_limits(kept))
        title = f"{study} / {dataset}" + (f"\n{tuned_view(tuned[metric])}" if swept else "")
        ax.set(title=title, xlabel="budget (epochs)", ylabel=f"{column_name(metric)}")
        ax.set_xticks(budgets)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, Path(path))


def off_scale(means: dict[str, list[float]], k: float = 6.0) -> set[str]:
    """The series that would squash the others into a line (the floor, an unregularised model): those whose
    mean lies more than ``k`` median absolute deviations from the median of the series' means (6 MADs are
    about 4 standard deviations of a normal spread). With fewer than four series, none."""
    import statistics

    centre = {v: statistics.fmean(m) for v, m in means.items()}
    if len(centre) < 4:
        return set()
    median = statistics.median(centre.values())
    mad = statistics.median(abs(c - median) for c in centre.values())
    return {v for v, c in centre.items() if mad > 0 and abs(c - median) > k * mad}


def plot_fid_vs_elbo(groups: Sequence[Group], path: str | Path) -> Path | None:
    """The sample table's ranking metric of prior samples (KID; FID in older records) against the ELBO (the
    post-hoc one; in older records the encoder's, hollow where it is the ex-post one), one panel per (study,
    dataset), 95% CI bars. None if no group has both."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = {}
    for key, table in tables_of(groups).items():
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
        xy = {g.label: (g.stats[elbo_key], g.stats[sample_key]) for g, elbo_key in pts}
        far = set().union(*(off_scale({label: [v[i].mean] for label, v in xy.items() if math.isfinite(v[i].mean)})
                            for i in (0, 1)))
        for i, (g, elbo_key) in enumerate(pts):
            x, y = xy[g.label]
            colour = colours[g.variant]
            label = g.label + (f" (off scale: {x.mean:.4g}, {y.mean:.3g})" if g.label in far else "")
            ax.errorbar(x.mean, y.mean, xerr=_errorbar(x), yerr=_errorbar(y), fmt=markers[i % len(markers)],
                        capsize=3, color=colour, mec=colour, ms=7, label=label,
                        mfc="none" if elbo_key == K.ELBO_EXPOST else colour)  # hollow: the ex-post ELBO
        posthoc = any(elbo_key == K.ELBO_POSTHOC for _, elbo_key in pts)
        xlabel = "ELBO of the post-hoc posterior (nats) →" if posthoc else \
            "ELBO (nats; the encoder's; hollow: ex-post) →"
        ax.set(title=table_title(key).replace(" — ", "\n"), xlabel=xlabel,
               ylabel=f"{column_name(sample_key)} of prior samples")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        kept = [v for label, v in xy.items() if label not in far]
        ys = [y.mean for _, y in kept]
        if far and kept:  # the axes cover the rest: the floor and a collapsed model are named, off scale
            ax.set_xlim(*_limits([x for x, _ in kept]))
            ax.set_ylim(*_limits([y for _, y in kept]))
        elif min(ys) > 0 and max(ys) >= 10 * min(ys):
            ax.set_yscale("log")  # a collapsed model's samples would squash the others into a corner
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, Path(path))


def plot_gaussianity(groups: Sequence[Group], path: str | Path) -> Path | None:
    """One panel per latent-Gaussianity metric, one point per group with its 95% CI; None if none is
    recorded."""
    from matplotlib.figure import Figure

    groups = in_rank_order(groups)
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
        ax.set_title(column_name(name))
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(" / ".join(sorted({table_title(g.table) for g in groups})))
    return _save(fig, Path(path))


def plot_samples(groups: Sequence[Group], results_dir: str | Path, path: str | Path) -> Path | None:
    """The prior-sample grid of each group's first seed side by side; None if no grid file exists."""
    found = []
    for g in [g for table in tables_of(groups).values() for g in rank(table, "Samples")]:
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
    found = [(g, Path(results_dir) / "runs" / g.study / g.latent_map) for g in in_rank_order(groups) if g.latent_map]
    return _tiles([(g, png) for g, png in found if png.is_file()], path, cols=2, size=(8, 3.9), fontsize=11)


PLOTS = {  # file stem: (the view whose groups it shows in a swept study, the plot)
    "fid_vs_elbo": ("likelihood", lambda gs, root, p: plot_fid_vs_elbo(gs, p)),
    "gaussianity": ("likelihood", lambda gs, root, p: plot_gaussianity(gs, p)),
    "samples": ("samples", plot_samples),
    "latent_2d": ("likelihood", plot_latent_maps),
    "budgets": (None, lambda gs, root, p: plot_budgets(gs, p)),
}


def write_plots(groups: Sequence[Group], root: Path) -> list[str]:
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
