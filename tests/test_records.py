"""Run records and the leaderboard: atomic writes, the finished-record guard, statistics over seeds,
ranking direction, failure counting, the outputs, and the protocol-gated comparison with published values."""

import csv
import math
import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from benchmark.errors import UsageError
from benchmark.metrics import keys as K
from benchmark.cli import leaderboard_main
from benchmark.leaderboard.references import reproduction_rows
from benchmark.leaderboard.tables import aggregate, paired_difference, paired_differences, rank, summarize
from benchmark.records import FinishedRecordError, code_version, environment, load_records, read_record, write_record
from helpers import cell, markdown_tables

CODE = {"commit": "0" * 40, "dirty": False}
PROTOCOL = {"fid_extractor": "domain", "fid_samples": 1000, "fid_reference": "test", "iw_samples": 100,
            "likelihood": "bernoulli", "binarize": "dynamic", "network": "mlp", "latent_dim": 8, "epochs": 5}


def record(variant="vae", seed=0, status="finished", study="s", dataset="digits", protocol=None, **metrics):
    return {"study": study, "run": f"{dataset}-{variant}-s{seed}", "dataset": dataset, "variant": variant,
            "seed": seed, "status": status, "reason": None if status == "finished" else "loss is nan",
            "diverged_step": 7 if status == "diverged" else None, "config": {}, "code": CODE,
            "env": {}, "device": "cpu", "timings": {"train_s": 1.0}, "metrics": metrics,
            "protocol": dict(PROTOCOL if protocol is None else protocol), "samples": None,
            "created": "2025-01-01T00:00:00"}


def write_all(root: Path, records):
    for r in records:
        write_record(root / "runs" / r["study"] / f"{r['run']}.json", r)


# --- writing and reading -------------------------------------------------------------------------------------

def test_round_trip_keeps_non_finite_metrics(tmp_path):
    r = record(elbo=-math.inf, fid_prior=np.float32(3.5))
    path = write_record(tmp_path / "a" / "r.json", r)
    back = read_record(path)
    assert back["metrics"]["elbo"] == -math.inf and back["metrics"]["fid_prior"] == 3.5
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []


def _hammer(folder: str, worker: int, n: int):
    blob = "x" * 200_000  # large enough that a non-atomic write would be seen half-done
    for i in range(n):
        r = record(seed=worker, status="running")
        r["config"] = {"blob": blob, "worker": worker, "i": i}
        write_record(Path(folder) / "shared.json", r)
        write_record(Path(folder) / f"own-{worker}.json", r)


def test_concurrent_writers_never_leave_a_partial_file(tmp_path):
    write_record(tmp_path / "shared.json", record(status="running"))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 15)) for w in range(3)]
    threads = [threading.Thread(target=_hammer, args=(str(tmp_path), w, 15)) for w in range(3, 6)]
    for t in procs + threads:
        t.start()
    reads = 0
    while any(p.is_alive() for p in procs) or any(t.is_alive() for t in threads):
        read_record(tmp_path / "shared.json")  # raises if it ever sees a half-written file
        reads += 1
    for t in procs + threads:
        t.join()
    assert all(p.exitcode == 0 for p in procs) and reads > 0
    for path in tmp_path.glob("*.json"):
        assert read_record(path)["config"]["i"] == 14
    assert list(tmp_path.glob("*.tmp")) == []


def test_write_refuses_what_is_not_a_record(tmp_path):
    with pytest.raises(ValueError, match="status"):
        write_record(tmp_path / "r.json", {**record(), "status": "done"})
    assert not (tmp_path / "r.json").exists()


def test_finished_record_is_never_overwritten(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, record(status="running"))
    write_record(path, record(status="finished", elbo=-90.0))
    with pytest.raises(FinishedRecordError, match="finished"):
        write_record(path, record(status="running"))
    assert read_record(path)["metrics"]["elbo"] == -90.0
    write_record(path, record(status="finished", elbo=-80.0), overwrite=True)
    assert read_record(path)["metrics"]["elbo"] == -80.0


def test_racing_finished_writers_keep_exactly_one(tmp_path):
    path, outcomes = tmp_path / "r.json", []

    def finish(i):
        try:
            write_record(path, record(status="finished", elbo=float(i)))
            outcomes.append(i)
        except FinishedRecordError:
            pass

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 1 and read_record(path)["metrics"]["elbo"] == outcomes[0]


def test_load_records_skips_unreadable_files(tmp_path):
    write_all(tmp_path, [record(seed=0), record(seed=1)])
    (tmp_path / "runs" / "s" / "broken.json").write_text('{"study": "s", "run"')
    (tmp_path / "runs" / "s" / "other.json").write_text('{"not": "a record"}')
    with pytest.warns(UserWarning, match="skipping unreadable record"):
        records = load_records(tmp_path)
    assert sorted(r["seed"] for r in records) == [0, 1]


def test_code_version_and_environment(tmp_path):
    assert code_version(tmp_path) == {"commit": None, "dirty": None}  # not a git repository
    env = environment()
    assert env["python"] and env["torch"] and env["cpu_count"] >= 1


# --- statistics and ranking ----------------------------------------------------------------------------------

def test_summary_matches_a_hand_computation():
    x = np.array([1.0, 2.0, 3.0])
    s = summarize(x.tolist())
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert (s.mean, s.n) == (2.0, 3)
    assert s.std == pytest.approx(1.0) and s.ci95 == pytest.approx(half)
    assert s.ci95 == pytest.approx(2.4842, abs=1e-4)  # 4.3027 / sqrt(3)
    one = summarize([5.0, None, math.nan, -math.inf])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.ci95) and "n/a (1)" in one.cell()
    assert summarize([None]) is None


def test_aggregate_groups_and_counts_failures_apart():
    records = [record("vae", 0, elbo=-90.0), record("vae", 1, elbo=-92.0), record("vae", 2, elbo=-94.0),
               record("vae", 3, status="diverged", elbo=-1e9), record("vae", 4, status="failed"),
               record("vae", 5, status="running"), record("ae", 0, elbo=-100.0)]
    g = {g.variant: g for g in aggregate(records)}
    assert g["vae"].stats["elbo"].mean == -92.0 and g["vae"].stats["elbo"].n == 3
    assert (g["vae"].n_diverged, g["vae"].n_failed, g["vae"].n_running) == (1, 1, 1)
    assert g["vae"].seeds == [0, 1, 2] and g["ae"].stats["elbo"].n == 1
    assert list(aggregate(records, metrics=["rate"])[0].stats) == []


def test_ranking_follows_the_metric_direction():
    fid = aggregate([record("a", fid_prior=30.0, elbo=-80.0), record("b", fid_prior=10.0, elbo=-95.0),
                     record("c", elbo=-70.0)])
    assert [g.variant for g in rank(fid, "Samples")] == ["b", "a", "c"]  # lower FID first; no FID last
    assert [g.variant for g in rank(fid, "Likelihood")] == ["c", "a", "b"]  # each table its own metric
    kid = aggregate([record("a", fid_prior=30.0, kid_prior=0.01, nll_iw=80.0, elbo=-70.0),
                     record("b", fid_prior=10.0, kid_prior=0.02, nll_iw=90.0, elbo=-60.0)])
    assert [g.variant for g in rank(kid, "Samples")] == ["a", "b"]  # KID, not FID, where it is recorded
    assert [g.variant for g in rank(kid, "Likelihood")] == ["a", "b"]  # nll_iw, not the ELBO
    elbo = aggregate([record("a", elbo=-95.0), record("b", elbo=-80.0),
                      record("c", elbo=-math.inf, elbo_expost=-85.0)])
    assert [g.variant for g in rank(elbo)] == ["b", "c", "a"]  # higher ELBO first, ex-post where missing


def test_paired_difference_matches_a_hand_computation():
    # differences 0.26, 0.38, 0.50: mean 0.38, sd 0.12, half-width t_{0.975, 2} 0.12 / sqrt(3) = 0.2981
    d = paired_difference({0: 100.26, 1: 101.38, 2: 99.5}, {0: 100.0, 1: 101.0, 2: 99.0})
    assert (d.n, d.n_sign, d.seeds) == (3, 3, (0, 1, 2))
    assert d.mean == pytest.approx(0.38) and d.std == pytest.approx(0.12)
    assert d.ci95 == pytest.approx(4.302653 * 0.12 / math.sqrt(3), rel=1e-6)
    assert d.cell() == "+0.38 ± 0.3 (3/3)"
    # one seed against the others: the sign holds in 2 of 3
    mixed = paired_difference({0: 1.0, 1: 2.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 1.0})
    assert mixed.mean == pytest.approx(2.5 / 3) and mixed.n_sign == 2 and mixed.cell().endswith("(2/3)")


def test_paired_difference_leaves_out_unpaired_seeds_and_has_no_ci_for_one_seed():
    # seed 1 only in the variant, seed 2 only in the reference, seed 3 non-finite on one side
    d = paired_difference({0: 5.0, 1: 9.0, 3: -math.inf}, {0: 7.0, 2: 1.0, 3: 2.0})
    assert (d.mean, d.n, d.n_sign, d.seeds) == (-2.0, 1, 1, (0,))
    assert math.isnan(d.ci95) and d.cell() == "-2 ± n/a (1/1)"
    assert paired_difference({1: 1.0}, {2: 1.0}) is None


def test_paired_differences_per_table_and_leaderboard_section(tmp_path):
    nll = {"vae": [90.0, 91.0, 92.0], "ae_moments": [90.3, 91.4, 92.5], "ae": [95.0, 96.0, None]}
    records = [record(v, seed, **({"nll_iw": x} if x is not None else {}), elbo=-x if v == "vae" else -math.inf,
                      gauss_kl=0.1 * seed, hz_p=0.5)
               for v, xs in nll.items() for seed, x in enumerate(xs)]
    records += [record("vae", 7, status="diverged", nll_iw=1e9), record("ae", 7, nll_iw=1.0),  # no vae seed 7
                record("rae", 0, study="other", nll_iw=80.0)]  # a table without the reference: no rows
    rows = {(r.variant, r.metric): r for r in paired_differences(records)}
    assert {r.study for r in rows.values()} == {"s"} and not any(v == "vae" for v, _ in rows)
    moments = rows["ae_moments", "nll_iw"].diff
    assert moments.mean == pytest.approx(0.4) and (moments.n, moments.n_sign) == (3, 3)
    assert rows["ae", "nll_iw"].diff.n == 2  # seed 2 has no nll_iw, seed 7 no finished vae run
    assert ("ae", "elbo") not in rows  # -inf on every seed: nothing to pair
    assert rows["ae", "gauss_kl"].diff.mean == 0.0 and rows["ae", "gauss_kl"].diff.n_sign == 3
    other = {(r.variant, r.metric): r for r in paired_differences(records, reference="ae")}
    assert other["vae", "nll_iw"].diff.mean == pytest.approx(-5.0) and other["vae", "nll_iw"].reference == "ae"

    write_all(tmp_path, records)
    tables = markdown_tables(leaderboard_main([str(tmp_path)]).read_text())
    assert {path[1] for path in tables if path[0] == "Paired differences to vae"} == {"s / digits"}  # no
    # vae in study "other": nothing to pair with
    paired = {row["variant"]: row for row in tables["Paired differences to vae", "s / digits"]}
    moments = cell(paired["ae_moments"]["nll_iw ↓"])
    assert moments.mean == pytest.approx(0.4) and (moments.n, moments.of) == (3, 3)
    others = tables["Paired differences to vae", "s / digits", "Other metrics:"]
    assert all("hz_p" not in row for row in others) and cell(others[0]["gauss_kl ↓"]).of == 3  # hz_p, without a
    # direction, is in the CSV only
    with open(tmp_path / "leaderboard_paired.csv") as f:
        csv_rows = {(r["variant"], r["metric"]): r for r in csv.DictReader(f)}
    row = csv_rows["ae_moments", "nll_iw"]
    assert (row["reference"], row["n"], row["n_sign"], row["seeds"]) == ("vae", "3", "3", "0 1 2")
    assert float(row["mean"]) == pytest.approx(0.4) and ("ae", "hz_p") in csv_rows
    leaderboard_main([str(tmp_path), "--reference-variant", "ae"])
    tables = markdown_tables((tmp_path / "leaderboard.md").read_text())
    assert {row["variant"] for row in tables["Paired differences to ae", "s / digits"]} >= {"vae", "ae_moments"}
    with pytest.raises(UsageError, match="--reference-variant wae: no record has that variant"):
        leaderboard_main([str(tmp_path), "--reference-variant", "wae"])


# --- the leaderboard -----------------------------------------------------------------------------------------

def test_leaderboard_writes_markdown_csv_and_plots(tmp_path, capsys):
    from matplotlib.image import imsave

    (tmp_path / "runs" / "s").mkdir(parents=True)
    imsave(tmp_path / "runs" / "s" / "grid.png", np.random.default_rng(0).random((16, 16)), cmap="gray")
    records = []
    for v, (fid, elbo) in {"vae": (20.0, -90.0), "ae": (40.0, None), "wae_mmd": (15.0, -100.0)}.items():
        for seed in range(3):
            m = {"fid_prior": fid + seed, "gauss_kl": 0.1 * (seed + 1), "gauss_mmd": 1e-3, "ks_frac": 0.5,
                 "elbo": elbo + seed if elbo else -math.inf}
            if elbo is None:
                m["elbo_expost"] = -120.0 + seed
            r = record(v, seed, **m)
            r["samples"] = "grid.png"
            records.append(r)
    records.append(record("vae", 9, status="diverged"))
    write_all(tmp_path, records)

    md = leaderboard_main([str(tmp_path)])
    assert md == tmp_path / "leaderboard.md" and str(md) in capsys.readouterr().out
    text = md.read_text()
    tables = markdown_tables(text)
    samples = tables["s / digits", "Samples, ranked by fid_prior ↓"]
    assert [(row["rank"], row["variant"]) for row in samples] == [("1", "wae_mmd"), ("2", "vae"), ("3", "ae")]
    best = cell(samples[0]["fid_prior ↓"])
    assert best.mean == 16 and best.n == 3 and best.ci == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3), 3e-3)
    assert (samples[1]["diverged"], samples[1]["failed"]) == ("1", "0")  # one diverged run counted, not averaged
    assert cell(samples[1]["fid_prior ↓"]).n == 3
    likelihood = tables["s / digits",
                        "Likelihood, ranked by elbo (encoder's q) ↑ (elbo_expost where it is missing)"]
    assert [row["variant"] for row in likelihood] == ["vae", "wae_mmd", "ae"]
    ae = likelihood[2]
    assert cell(ae["elbo_expost (ex-post q) ↑"]).mean == -119 and ae["elbo (encoder's q) ↑"] == "–"
    with open(tmp_path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    fid = next(r for r in rows if r["variant"] == "vae" and r["metric"] == "fid_prior")
    assert float(fid["mean"]) == 21.0 and int(fid["n"]) == 3
    assert float(fid["ci95"]) == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    for name in ("fid_vs_elbo.png", "gaussianity.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"]({name})" in text


def test_leaderboard_skips_plots_it_has_no_data_for(tmp_path):
    write_all(tmp_path, [record("vae", s, elbo=-90.0 - s) for s in range(2)])
    (tmp_path / "samples.png").write_bytes(b"stale")
    leaderboard_main([str(tmp_path)])
    assert not any((tmp_path / n).exists() for n in ("fid_vs_elbo.png", "gaussianity.png", "samples.png"))
    tables = markdown_tables((tmp_path / "leaderboard.md").read_text())
    assert list(tables) == [("s / digits", "Likelihood, ranked by elbo (encoder's q) ↑")]


def _references(path: Path, protocol: dict, unsure=()):
    path.write_text(yaml.safe_dump({"references": [{
        "id": "paper-t1", "dataset": "digits", "metric": "fid_prior", "source": {"paper": "P"},
        "protocol": protocol, "unsure": list(unsure),
        "values": [{"variant": "vae", "label": "VAE", "value": 18.0},
                   {"variant": "ae", "label": "AE", "value": None, "note": "not in the table"},
                   {"variant": "rae", "label": "RAE", "value": 9.0}]}]}))
    return path


def test_reference_compared_only_where_the_protocol_matches(tmp_path):
    ref = {"fid_extractor": "domain", "latent_dim": 8, "epochs": 5}
    records = [record("vae", s, study="same", fid_prior=20.0 + s) for s in range(2)]
    records += [record("vae", s, study="other", protocol={**PROTOCOL, "latent_dim": 16}, fid_prior=30.0)
                for s in range(2)]
    records += [record("ae", 0, study="same", fid_prior=50.0)]
    write_all(tmp_path, records)
    _references(tmp_path / "references.yaml", ref)
    tables = markdown_tables(leaderboard_main([str(tmp_path)]).read_text())
    rows = {(row["study"], row["variant"]): row for row in tables["Reproduction of published values",]}
    same, other = rows["same", "VAE (vae)"], rows["other", "VAE (vae)"]
    assert cell(same["measured"]).mean == 20.5 and (same["reference"], same["difference"]) == ("18", "2.5")
    assert (other["measured"], other["reference"], other["difference"]) == ("–", "18", "–")
    assert "latent_dim 16 vs reference 8" in other["note"]
    assert "not in the table" in rows["same", "AE (ae)"]["note"]
    assert "no runs" in next(row["note"] for key, row in rows.items() if key[1] == "RAE (rae)")


def test_reproduction_rows_report_missing_and_unsure_fields(tmp_path):
    groups = aggregate([record("vae", 0, protocol={"latent_dim": 8}, fid_prior=20.0)])
    refs = yaml.safe_load(_references(tmp_path / "r.yaml", {"latent_dim": 8, "image_size": 32}).read_text())
    row = reproduction_rows(groups, refs["references"])[0]
    assert row["measured"] is None
    assert row["why"] == "protocol differs: image_size not recorded (reference 32)"
    refs["references"][0]["unsure"] = ["image_size"]
    row = reproduction_rows(groups, refs["references"])[0]
    assert row["difference"] == 2.0 and row["why"] == "not checked: image_size"


def test_a_reference_may_name_several_data_configs_and_each_is_compared_on_its_own_protocol(tmp_path):
    groups = aggregate([record("vae", 0, dataset="mnist_static", protocol={"binarize": "static"}, nll_iw=90.0),
                        record("vae", 0, dataset="mnist_binary", protocol={"binarize": "dynamic"}, nll_iw=95.0),
                        record("vae", 0, dataset="digits", protocol={"binarize": "static"}, nll_iw=9.0)])
    ref = {"id": "r", "dataset": ["mnist_static", "mnist_binary"], "metric": "nll_iw", "source": {"paper": "P"},
           "protocol": {"binarize": "static"}, "values": [{"variant": "vae", "value": 89.9}]}
    rows = {r["dataset"]: r for r in reproduction_rows(groups, [ref])}
    assert set(rows) == {"mnist_static", "mnist_binary"}  # digits is not named
    assert rows["mnist_static"]["difference"] == pytest.approx(0.1)
    assert rows["mnist_binary"]["measured"] is None and "binarize" in rows["mnist_binary"]["why"]


def test_bundled_references_are_well_formed():
    from benchmark.leaderboard.references import load_references

    root = Path(__file__).resolve().parents[1]
    entries = load_references(root / "results" / "references.yaml")
    assert {e["metric"] for e in entries} <= set(K.HIGHER_IS_BETTER)
    assert all(e["source"].get("paper") for e in entries)


def test_bad_results_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        leaderboard_main([str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="no run records"):
        leaderboard_main([str(tmp_path)])
    write_all(tmp_path, [record()])
    (tmp_path / "references.yaml").write_text("references: 3\n")
    with pytest.raises(UsageError, match="references"):
        leaderboard_main([str(tmp_path)])


def test_an_old_deterministic_record_shows_its_ex_post_elbo_under_that_name_only():
    """Before the post-hoc posterior a deterministic encoder's record held the ex-post ELBO as ``elbo`` too:
    no column may call that number the encoder's own."""
    old = [record("ae", s, elbo=-120.0 + s, elbo_expost=-120.0 + s, distortion=80.0, rate=40.0, nll_iw=110.0)
           for s in range(2)]
    new = [record("vae", s, elbo=-100.0 + s, distortion=80.0, rate=20.0, nll_iw=95.0) for s in range(2)]
    groups = {g.variant: g for g in aggregate(old + new)}
    assert set(groups["ae"].stats) == {"elbo_expost", "nll_iw"}
    assert groups["ae"].stats["elbo_expost"].mean == pytest.approx(-119.5)
    assert {"elbo", "distortion", "rate"} <= set(groups["vae"].stats)


# --- a user's rows beside the committed ones -------------------------------------------------------------------

def test_a_users_rows_rank_beside_another_folders_with_the_protocol_fields_that_differ(tmp_path):
    from benchmark.leaderboard import write_leaderboard
    from benchmark.leaderboard.tables import beside_tables

    mine, committed = tmp_path / "mine", tmp_path / "results"
    write_all(mine, [record("vae", s, study="quick", nll_iw=v) for s, v in [(0, 30.0), (1, 31.0)]])
    longer = {**PROTOCOL, "epochs": 50}
    write_all(committed, [record("vae", s, study="quick", nll_iw=v) for s, v in [(0, 28.0), (1, 29.0)]]
              + [record("ae", s, study="quick", nll_iw=v, protocol=longer) for s, v in [(0, 40.0), (1, 41.0)]]
              + [record("vae", 0, study="quick", dataset="mnist", nll_iw=90.0)]  # another dataset: not beside
              + [record("swae", 0, study="quick", status="diverged")])           # no finished run: not beside
    groups = aggregate(load_records(mine))
    tables = beside_tables(groups, [("results", aggregate(load_records(committed)))])
    (key, rows), = tables.items()
    assert key == ("quick", None, "digits", None)
    assert [(r.source, r.group.variant, r.group.stats["nll_iw"].mean) for r in rows] == [
        ("results: quick", "vae", 28.5), ("yours", "vae", 30.5), ("results: quick", "ae", 40.5)]
    assert [r.differs for r in rows] == [[], None, ["epochs 50 vs 5"]]
    tables = markdown_tables(write_leaderboard(mine, beside=[committed]).read_text())
    beside = tables["Beside other results", f"quick / digits, beside {committed}"]
    assert [(row["from"], row["variant"], row["protocol vs yours"]) for row in beside] == [
        (f"{committed}: quick", "vae", "same"), ("yours", "**vae**", ""),
        (f"{committed}: quick", "ae", "epochs 50 vs 5")]
    # a user's folder with nothing beside it on its datasets says so; a missing folder is bad input
    other = tmp_path / "other"
    write_all(other, [record("vae", 0, study="x", dataset="cifar", nll_iw=1.0)])
    assert "No other folder has finished runs" in write_leaderboard(mine, beside=[other]).read_text()
    with pytest.raises(UsageError, match="--beside .*absent"):
        write_leaderboard(mine, beside=[tmp_path / "absent"])
