"""Tuning on the validation split: the chosen setting is the best by its validation criterion over seeds, a
setting that diverged is never chosen, no test metric can move a choice, and the leaderboard shows the tuned,
untuned and budget views of a swept study."""

import copy
import csv
import random

import pytest

from benchmark.metrics import keys as K
from benchmark.leaderboard import write_leaderboard
from benchmark.records import write_record
from benchmark.selection import CRITERIA, UNTUNED, at_edge, cell_of, select, setting_label, tuned_view, views
from helpers import cell, markdown_tables

WEIGHTS = (1.0, 10.0, 100.0)
CONFIGURED = 10.0


def run(variant, seed, weight=None, budget=10, status="finished", val_elbo=-100.0, val_kid=0.5, **metrics):
    setting = {} if weight is None else {"model.init_args.weight": weight}
    name = "-".join([variant, *([f"weight{weight:g}"] if weight is not None else []), f"e{budget}", f"s{seed}"])
    return {"study": "s", "run": name, "dataset": "mnist_binary", "variant": variant, "seed": seed,
            "setting": setting, "default_setting": weight in (None, CONFIGURED), "budget": budget, "status": status,
            "metrics": {K.NLL_IW: 90.0, K.KID_PRIOR: 0.4, K.ELBO_POSTHOC: -95.0, **metrics} if status == "finished"
            else {}, "validation": {K.ELBO_POSTHOC: val_elbo, K.KID_PRIOR: val_kid} if status == "finished" else {},
            "protocol": {}, "config": {}}


def sweep_records(budgets=(10,)):
    """wae_mmd at three weights over three seeds: weight 100 has the best validation ELBO on average (though
    not in every seed), weight 1 the best validation KID; vae has no sweep."""
    val_elbo = {1.0: [-99, -98, -100], 10.0: [-97, -96, -99], 100.0: [-95, -97, -96]}
    val_kid = {1.0: [0.2, 0.3, 0.25], 10.0: [0.4, 0.35, 0.5], 100.0: [0.6, 0.7, 0.65]}
    out = []
    for budget in budgets:
        for seed in range(3):
            out.append(run("vae", seed, budget=budget, val_elbo=-94.0 - seed, val_kid=0.3,
                           **{K.NLL_IW: 89.0 + seed * 0.1 - budget * 0.01}))
            for w in WEIGHTS:
                out.append(run("wae_mmd", seed, w, budget=budget, val_elbo=val_elbo[w][seed], val_kid=val_kid[w][seed],
                               **{K.NLL_IW: 92.0 + w / 100 + seed * 0.1 - budget * 0.02}))
    return out


def chosen(records):
    return {name: select(records, criterion) for name, criterion in CRITERIA.items()}


def test_each_criterion_picks_the_setting_best_on_average_over_seeds():
    records = sweep_records()
    picks = chosen(records)
    cell = ("s", "mnist_binary", "wae_mmd", "10")
    assert picks["likelihood"][cell] == "weight=100"  # mean -96.0 beats -97.3 (weight 10) and -99 (weight 1)
    assert picks["samples"][cell] == "weight=1"       # KID is lower-is-better
    assert picks["likelihood"][("s", "mnist_binary", "vae", "10")] == ""  # a variant without a sweep keeps its run


def test_no_test_metric_can_move_a_selection():
    records = sweep_records()
    before = chosen(records)
    view_runs = {v: sorted(r["run"] for r in rs) for v, rs in views(records)}
    rng = random.Random(0)
    scrambled = copy.deepcopy(records)
    for r in scrambled:  # every test metric replaced, the validation criteria untouched
        r["metrics"] = {k: rng.uniform(-1e3, 1e3) for k in r["metrics"]} | {"extra": rng.random()}
        r["samples"] = "other.png"
    assert chosen(scrambled) == before
    assert {v: sorted(r["run"] for r in rs) for v, rs in views(scrambled)} == view_runs
    # while the validation criteria do move it: the check can fail
    for r in scrambled:
        if r["variant"] == "wae_mmd" and r["setting"]["model.init_args.weight"] == 1.0:
            r["validation"][K.ELBO_POSTHOC] = -50.0
    assert chosen(scrambled)["likelihood"][("s", "mnist_binary", "wae_mmd", "10")] == "weight=1"


def test_a_setting_with_a_diverged_run_is_never_chosen_and_ties_go_to_the_configured_one():
    records = [r for r in sweep_records() if not (r["variant"] == "wae_mmd" and r["seed"] == 2
                                                  and r["setting"]["model.init_args.weight"] == 100.0)]
    records.append(run("wae_mmd", 2, 100.0, status="diverged"))
    cell = ("s", "mnist_binary", "wae_mmd", "10")
    assert select(records, K.ELBO_POSTHOC)[cell] == "weight=10"
    tie = [run("ae", s, w, val_elbo=-90.0) for s in range(2) for w in WEIGHTS]
    assert select(tie, K.ELBO_POSTHOC)[("s", "mnist_binary", "ae", "10")] == "weight=10"


def test_views_are_the_chosen_settings_per_budget_and_the_configured_ones():
    records = sweep_records(budgets=(10, 30))
    by_view = dict(views(records))
    assert set(by_view) == {tuned_view("likelihood"), tuned_view("samples"), UNTUNED}
    for view, rs in by_view.items():
        assert all(r["view"] == view for r in rs)
        assert len(rs) == 2 * 2 * 3  # 2 budgets x (vae, wae_mmd) x 3 seeds: one setting per cell
    untuned = {setting_label(r) for r in by_view[UNTUNED] if r["variant"] == "wae_mmd"}
    assert untuned == {"weight=10"}
    assert {cell_of(r)[3] for r in by_view[UNTUNED]} == {"10", "30"}
    unswept = [r for r in records if r["variant"] == "vae"]
    assert views(unswept) == [(None, unswept)]  # nothing to choose: the records as they are
    other = [{**r, "study": "other"} for r in unswept]  # an unswept study in the same folder keeps no view
    by_view = dict(views(records + other))
    assert by_view[None] == other and all(r["study"] == "s" for v, rs in by_view.items() if v for r in rs)


def test_the_leaderboard_of_a_swept_study_shows_the_selection_the_tuned_and_untuned_tables_and_the_budgets(
        tmp_path):
    records = sweep_records(budgets=(10, 30))
    for r in records:
        write_record(tmp_path / "runs" / r["study"] / f"{r['run']}.json", r)
    text = write_leaderboard(tmp_path).read_text()
    tables = markdown_tables(text)
    selection = {(row["variant"], row["setting"]): row
                 for row in tables["Selection on the validation split", "s / mnist_binary / 10 epochs"]}
    assert selection["wae_mmd", "weight=100"]["chosen for"] == "likelihood (at the sweep's end)"  # the largest
    assert selection["wae_mmd", "weight=10"]["chosen for"] == "untuned"
    assert cell(selection["wae_mmd", "weight=1"]["validation elbo_posthoc ↑"]).mean == -99
    tuned = [path for path in tables if path[0] == f"s / mnist_binary / 30 epochs — {tuned_view('likelihood')}"]
    assert [path[1] for path in tuned] == ["Likelihood, ranked by nll_iw ↓"]  # no Samples table in this view
    assert [row["variant"] for row in tables[tuned[0]]] == ["vae", "wae_mmd (weight=100)"]
    assert [row["variant"] for row in tables[f"s / mnist_binary / 10 epochs — {UNTUNED}",
                                              "Likelihood, ranked by nll_iw ↓"]] == ["vae", "wae_mmd (weight=10)"]
    ranks = tables["Rankings across budgets and tuning", "s / mnist_binary: rank by nll_iw ↓"]
    assert [(row["variant"], row["10 epochs tuned"], row["30 epochs untuned"]) for row in ranks] == [
        ("vae", "1", "1"), ("wae_mmd", "2", "2")]
    assert "](budgets.png)" in text and (tmp_path / "budgets.png").stat().st_size > 1000
    with open(tmp_path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r["metric"] == f"val/{K.ELBO_POSTHOC}" and r["view"] == "all settings"
           and r["variant"] == "wae_mmd" and r["budget"] == "10"]
    assert {r["setting"]: round(float(r["mean"]), 3) for r in val} == {
        "weight=1": -99.0, "weight=10": -97.333, "weight=100": -96.0}


def test_the_budget_plot_leaves_the_floor_and_the_unregularised_model_off_its_scale():
    """Values of the tuned binarised study at 10 epochs: no_info (the floor) and ae are tens of nats from the
    rest, and on one axis the 4-nat spread of the others, which the plot is for, would be a line."""
    from benchmark.leaderboard.plots import off_scale

    nll = {"vae": [97.7], "swae": [99.3], "wae_mmd": [99.7], "ae_moments": [99.7], "aae": [100.4],
           "vae_fullcov": [101.6], "ae": [154.9, 145.7], "no_info": [205.1]}
    assert off_scale(nll) == {"ae", "no_info"}
    assert off_scale({k: v for k, v in nll.items() if k not in ("ae", "no_info")}) == set()  # a spread, no outlier
    assert off_scale({"vae": [97.7], "ae": [154.9], "no_info": [205.1]}) == set()  # too few to tell
    assert off_scale({v: [1.0] for v in "abcd"}) == set()  # no spread at all


@pytest.mark.parametrize("budget_rank_change", [False, True])
def test_the_rankings_section_says_whether_the_order_changed_between_budgets(tmp_path, budget_rank_change):
    records = []
    for budget in (10, 30):
        for seed in range(2):
            late = budget == 30 and budget_rank_change
            records.append(run("vae", seed, budget=budget, **{K.NLL_IW: 90.0}))
            records.append(run("ae", seed, budget=budget, **{K.NLL_IW: 89.0 if late else 91.0}))
    for r in records:
        write_record(tmp_path / "runs" / r["study"] / f"{r['run']}.json", r)
    text = write_leaderboard(tmp_path).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- 10 → 30 epochs") and "nll_iw" not in x)
    assert ("1 pair(s) change places: vae/ae" in line) == budget_rank_change
    assert ("same order" in line) != budget_rank_change


def test_a_budget_still_missing_a_setting_is_undecided_and_settings_are_compared_on_common_seeds(tmp_path):
    records = sweep_records()
    cell = ("s", "mnist_binary", "wae_mmd", "10")
    partial = [r for r in records if not (r["variant"] == "wae_mmd" and r["setting"]["model.init_args.weight"] == 1.0)]
    assert cell in select(records, K.ELBO_POSTHOC)
    assert cell in select(partial, K.ELBO_POSTHOC)  # weight 1 appears nowhere: the sweep is {10, 100} so far
    partial.append(run("wae_mmd", 0, 1.0, budget=30))  # now the variant has weight 1 at another budget
    assert cell not in select(partial, K.ELBO_POSTHOC)
    without_default = [r for r in records if not (r["variant"] == "wae_mmd" and r["default_setting"])]
    assert cell not in select(without_default + [run("wae_mmd", 0, 10.0, budget=30)], K.KID_PRIOR)
    # weight 100 finished seed 0 only, where it is worst; on all three seeds it would be best (test above)
    lone = [r for r in records if not (r["variant"] == "wae_mmd" and r["seed"] > 0
                                       and r["setting"]["model.init_args.weight"] == 100.0)]
    for r in lone:
        if r["variant"] == "wae_mmd" and r["seed"] == 0:
            r["validation"][K.ELBO_POSTHOC] = {1.0: -97.0, 10.0: -96.0, 100.0: -98.0}[r["setting"]["model.init_args.weight"]]
    assert select(lone, K.ELBO_POSTHOC)[cell] == "weight=10"  # seed 0 alone: the paired comparison
    for r in lone:
        write_record(tmp_path / "runs" / r["study"] / f"{r['run']}.json", r)
    text = write_leaderboard(tmp_path).read_text()
    assert "undecided" not in text
    write_record(tmp_path / "runs" / "s" / "extra.json", {**run("wae_mmd", 0, 1.0, budget=30), "run": "extra"})
    at_30 = markdown_tables(write_leaderboard(tmp_path).read_text())[
        "Selection on the validation split", "s / mnist_binary / 30 epochs"]
    row = next(row for row in at_30 if (row["variant"], row["setting"]) == ("wae_mmd", "weight=1"))
    assert row["chosen for"] == "undecided: settings still to run"  # weights 10 and 100 yet to run


def test_a_choice_at_either_end_of_a_numeric_sweep_is_flagged():
    records = sweep_records()
    cell = ("s", "mnist_binary", "wae_mmd", "10")
    assert at_edge(records, cell, "weight=1") and at_edge(records, cell, "weight=100")
    assert not at_edge(records, cell, "weight=10")
    two = [r for r in records if r["setting"].get("model.init_args.weight") != 100.0]
    assert not at_edge(two, cell, "weight=1")  # two values have no inside
