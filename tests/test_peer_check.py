"""The peer cross-check (``benchmark.perf.peer_check``): a dry run at a tiny budget writes the table and its
JSON, the suite's and pythae's estimators agree on the same model, a rerun keeps the finished seeds (those it
is not asked for too), each bad argument has its own message, and without pythae the command says so and runs
nothing."""

from __future__ import annotations

import json

import pytest

from benchmark.perf import peer_check
from helpers import markdown_tables

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_pythae_the_check_says_so_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peer_check, "HAVE_PYTHAE", False)
    out = tmp_path / "peer.md"
    assert peer_check.main(["--data", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "pythae is not installed" in capsys.readouterr().err and not out.exists()


def fake_seed(args, seed):
    return {side: {"train_s": 1.0 + seed, "elbo": -100.0 - seed, "nll_suite": 90.0 + seed,
                   "nll_pythae": 90.5 + seed} for side in peer_check.SIDES}


def test_a_rerun_with_other_seeds_keeps_and_reports_every_saved_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peer_check, "HAVE_PYTHAE", True)
    trained = []
    monkeypatch.setattr(peer_check, "run_seed", lambda args, seed: trained.append(seed) or fake_seed(args, seed))
    out = tmp_path / "peer.md"
    base = ["--data", str(tmp_path / "absent"), "--out", str(out)]
    assert peer_check.main([*base, "--seeds", "0", "1"]) == 0
    capsys.readouterr()
    assert peer_check.main([*base, "--seeds", "1", "2"]) == 0
    assert trained == [0, 1, 2]
    printed = capsys.readouterr().out
    assert "seeds [1] already done" in printed and "seeds [0] of" in printed
    assert set(json.loads(out.with_suffix(".json").read_text())["seeds"]) == {"0", "1", "2"}
    per_seed = markdown_tables(out.read_text())["Per seed",]
    assert sorted({row["seed"] for row in per_seed}) == ["0", "1", "2"]


@pytest.mark.parametrize("bad, message", [(["--epochs", "0"], "--epochs 0: train at least 1 epoch"),
                                          (["--k", "0"], "--k 0: the estimators need at least 1"),
                                          (["--seeds", "1", "1"], "--seeds 1 1: a seed is given twice")])
def test_each_bad_argument_has_its_own_message(tmp_path, monkeypatch, capsys, bad, message):
    monkeypatch.setattr(peer_check, "HAVE_PYTHAE", True)
    with pytest.raises(SystemExit):
        peer_check.main(["--data", str(tmp_path), "--out", str(tmp_path / "peer.md"), *bad])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not peer_check.HAVE_PYTHAE, reason="pythae is not installed (pip install 'latent-bench[pythae]')")
def test_a_dry_run_scores_both_implementations_with_both_estimators_that_agree(tmp_path, mnist_pkl, capsys):
    out = tmp_path / "peer.md"
    args = ["--data", str(mnist_pkl), "--seeds", "0", "1", "--epochs", "1", "--limit-train", "2000",
            "--limit-test", "20", "--k", "500", "--out", str(out)]
    assert peer_check.main(args) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["protocol"]["iw_samples"] == 500 and set(saved["seeds"]) == {"0", "1"}
    for sides in saved["seeds"].values():
        assert set(sides) == {"suite", "pythae"}
        for r in sides.values():
            # L_500 on 20 images: both estimators near log p(x), far above the one-sample ELBO of a model
            # trained for 2000 images
            assert abs(r["nll_suite"] - r["nll_pythae"]) < 1.0, r
            assert -r["elbo"] > r["nll_suite"] and r["train_s"] > 0, r
    tables = markdown_tables(out.read_text())
    per_seed = tables["Per seed",]
    assert [(row["seed"], row["implementation"]) for row in per_seed] == [
        ("0", "suite"), ("0", "pythae"), ("1", "suite"), ("1", "pythae")]
    paired = {row["metric"]: row for row in tables["Suite − pythae, paired by seed",]}
    assert set(paired) == {"elbo", "nll_suite", "nll_pythae", "train_s"}
    assert all(row["within seed noise"] in ("yes", "no") for row in paired.values())

    capsys.readouterr()
    assert peer_check.main(args) == 0  # a rerun of the same protocol trains nothing
    assert "seeds [0, 1] already done" in capsys.readouterr().out
