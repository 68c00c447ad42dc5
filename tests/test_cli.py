"""The ``latent-bench`` entry point: bad input exits 2 with one line naming the problem and leaves nothing
behind; a small fit exits 0.

Most cases call ``benchmark.cli.main`` in this process (an import of Lightning costs ~8 s a process); one runs
the installed console script in a subprocess, which is where Lightning's own log lines would reach stderr.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmark import cli
from helpers import console_script

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER, VAE, DIGITS = (str(CONFIGS / f) for f in ("trainer/cpu.yaml", "model/vae.yaml", "data/digits.yaml"))
FIT = ["fit", "--config", TRAINER, "--config", VAE, "--config", DIGITS]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_one_error_line(err: str, *named: str):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("latent-bench: error: "), err
    assert "Traceback" not in err
    for word in named:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Bad input files, in a folder apart from the working directory (which must stay empty)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "typo.yaml").write_text("data:\n  datset: digits\n")
    (folder / "mnist.pkl.gz").write_bytes(os.urandom(4096))  # a file, but not MNIST
    (folder / "nope_variant.yaml").write_text(
        f"name: s\nconfigs: {CONFIGS}\ndatasets: [digits]\nvariants: [nope]\nseeds: [0]\n")
    (folder / "typo_study.yaml").write_text(
        f"name: s\nconfigs: {CONFIGS}\ndatasets: [digits]\nvariants: [vae]\nseeds: [0]\nvariant: [ae]\n")
    return folder


BAD_FIT = {  # case: (extra arguments, words the error line must contain)
    "unknown variant class": (["--model", "benchmark.variants.Nope"], ["benchmark.variants.Nope"]),
    "unknown variant attribute": (["--model.class_path", "benchmark.variants.Nope"], ["benchmark.variants.Nope"]),
    "unknown dataset key": (["--data.dataset", "nope"], ["'nope'", "digits"]),
    "zero latent_dim": (["--model.init_args.latent_dim", "0"], ["latent_dim", "0"]),
    "negative latent_dim": (["--model.init_args.latent_dim", "-3"], ["latent_dim", "-3"]),
    "bad binarize": (["--data.binarize", "maybe"], ["maybe"]),
    "zero batch size": (["--data.batch_size", "0"], ["data.batch_size"]),
    "missing data file": (["--data.dataset", "mnist", "--data.path", "{inputs}/absent.pkl.gz"],
                          ["absent.pkl.gz", "does not exist"]),
    "corrupt data file": (["--data.dataset", "mnist", "--data.path", "{inputs}/mnist.pkl.gz"], ["sha256"]),
    "bernoulli on continuous data": (["--model.init_args.likelihood", "bernoulli"], ["bernoulli likelihood", "binarize"]),
    "unknown YAML field": (["--config", "{inputs}/typo.yaml"], ["datset"]),
}


@pytest.mark.parametrize("case", list(BAD_FIT))
def test_bad_fit_input_exits_2_with_one_line_and_leaves_nothing(case, inputs, workdir, capsys):
    extra, named = BAD_FIT[case]
    assert cli.main(FIT + [a.format(inputs=inputs) for a in extra]) == 2
    assert_one_error_line(capsys.readouterr().err, *named)
    assert files_under(workdir) == []


@pytest.mark.parametrize("study, named", [("nope_variant.yaml", ["'nope'", "vae"]),
                                          ("typo_study.yaml", ["'variant'", "variants"]),
                                          ("absent.yaml", ["absent.yaml", "does not exist"])])
def test_bad_study_exits_2_with_one_line_and_leaves_nothing(study, named, inputs, workdir, capsys):
    argv = ["run", str(inputs / study), "--results", str(workdir / "results"), "--work-dir", str(workdir / "runs")]
    assert cli.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, *named)
    assert files_under(workdir) == [] and not (workdir / "results").exists() and not (workdir / "runs").exists()


STUDY = f"name: s\nconfigs: {CONFIGS}\ndatasets: [digits]\nvariants: [vae]\nseeds: [0]\n"
BAD_RUN = {  # case: (study YAML, extra arguments, words the error line must contain)
    "a network config as a variant": (STUDY.replace("[vae]", "[conv]"), [], ["conv.yaml", "not a variant", "vae"]),
    "a seed that is not a number": (STUDY.replace("[0]", "[a]"), [], ["'seeds' must be distinct integers"]),
    "a fractional seed": (STUDY.replace("[0]", "[0, 0.9]"), [], ["'seeds' must be distinct integers", "0.9"]),
    "a seed twice": (STUDY.replace("[0]", "[1, 1]"), [], ["'seeds' must be distinct integers"]),
    "more workers than cores": (STUDY, ["--devices", "99"], ["--devices 99"]),
    "a negative batch size": (STUDY, ["--set", "data.batch_size=-5"], ["run digits-vae-s0", "data.batch_size", "-5"]),
    "a budget that is no number": (STUDY, ["--set", "trainer.max_epochs=ten"], ["trainer.max_epochs=ten", "integer"]),
    "a data file for the embedded digits": (STUDY, ["--set", "data.path={inputs}/mnist.pkl.gz"], ["embedded", "data.path"]),
    "a folder without MNIST": (STUDY, ["--set", "data.dataset=mnist", "--set", "data.path={inputs}"],
                               ["holds no MNIST/ folder", "data.path"]),
    "results under a file": (STUDY, ["--results", "{inputs}/mnist.pkl.gz/results"], ["--results", "not a writable folder"]),
    "slurm parameters that are not JSON": (STUDY, ["--slurm", "gpus=1"], ["--slurm", "not JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_RUN))
def test_bad_run_input_is_refused_before_anything_trains(case, inputs, workdir, capsys):
    text, extra, named = BAD_RUN[case]
    (inputs / "study.yaml").write_text(text)
    argv = ["run", str(inputs / "study.yaml"), "--results", str(workdir / "results"), "--work-dir",
            str(workdir / "runs"), "--wandb", "disabled", *[a.format(inputs=inputs) for a in extra]]
    assert cli.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, *named)
    assert files_under(workdir) == [] and not (workdir / "results").exists() and not (workdir / "runs").exists()
    assert not (inputs / "MNIST").exists()  # nothing downloaded into a folder given as data


def test_run_passes_on_the_study_exit_status(monkeypatch):
    """A study with a failed run exits 1 (the study's own status), not 0."""
    import benchmark.study

    monkeypatch.setattr(benchmark.study, "run", lambda path, **kw: 1 if path == "s.yaml" else 0)
    assert cli.main(["run", "s.yaml"]) == 1


def test_unknown_command_exits_2_and_help_exits_0(capsys):
    assert cli.main(["fitt"]) == 2
    assert cli.main(["--help"]) == 0
    assert "latent-bench fit" in capsys.readouterr().out


def test_console_script_reports_bad_input_on_exactly_one_stderr_line(tmp_path):
    """Lightning logs "Seed set to 0" and "GPU available" while the classes are built; those lines must not
    reach stderr, which holds the error only."""
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}
    proc = subprocess.run(console_script() + FIT + ["--model.init_args.likelihood", "bernoulli"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "bernoulli likelihood")
    assert files_under(tmp_path) == []


def test_on_a_machine_with_slurm_installed_fit_prints_no_srun_hint(tmp_path):
    """A cluster's login node has srun on PATH: Lightning's hint to prepend it is noise on every run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(console_script() + FIT + ["--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar",
                                                    "false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "srun" not in proc.stderr, proc.stderr


def test_fit_on_digits_runs_an_epoch_and_exits_0(workdir, capsys):
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"]
    assert cli.main(FIT + quick + ["--trainer.enable_progress_bar", "false"]) == 0
    assert "error" not in capsys.readouterr().err
    checkpoints = list((workdir / "runs" / "fit").rglob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=0-step=5.ckpt"]
    assert (workdir / "runs" / "fit" / "config.yaml").is_file()  # the resolved config saved with the run
