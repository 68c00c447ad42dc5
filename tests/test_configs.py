"""Every YAML under configs/ instantiates through the CLI and runs a few steps on the CPU.

Model YAMLs run on the embedded digits; the MNIST data YAMLs on ../shared's mnist.pkl.gz (skipped where it is
absent). Datasets that need a download (CIFAR-10, Fashion-MNIST, CelebA) are instantiated, not loaded.
``trainer/gpu.yaml`` is parsed only (no GPU here; instantiated too where one is); ``trainer/auto.yaml`` is
built with the GPU count mocked both ways. ``trainer/ddp_cpu.yaml`` is instantiated but not run: a 2-process
``ddp_spawn`` fit costs a fresh Lightning import a rank, and the two-process runs live in the metric tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.lightning_cli import LatentBenchCLI, build_cli
from benchmark.spec import RunSpec
from benchmark.study import expand, load_study
from benchmark.variants import VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO = CONFIGS.parent
CPU, DIGITS = str(CONFIGS / "trainer" / "cpu.yaml"), str(CONFIGS / "data" / "digits.yaml")
QUICK = ["--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false"]

MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml") if p.stem != "conv")  # conv goes on top
DOWNLOADED = {"cifar10": (3, 32, 32), "fashion_mnist": (1, 28, 28), "celeba64": (3, 64, 64)}
MNIST_DATA = ["mnist", "mnist_binary", "mnist_static", "mnist_rae"]
DIGITS_DATA = ["digits", "digits_binary"]


def yaml_of(kind: str, key: str) -> str:
    return str(CONFIGS / kind / f"{key}.yaml")


def class_path(model_key: str) -> str:
    return yaml.safe_load(Path(yaml_of("model", model_key)).read_text())["model"]["class_path"]


def args(*files: str, extra=()) -> list[str]:
    return [a for f in files for a in ("--config", f)] + list(extra)


def fit_a_few_steps(argv: list[str]):
    """Build from the configs as the study runner does, then train 2 steps and validate 2 batches."""
    built = build_cli(argv, run=False, save_config_callback=None)
    trainer = built.instantiate_trainer()
    trainer.fit(built.model, datamodule=built.datamodule)
    assert trainer.global_step == 2
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/loss")}
    assert set(losses) == {"train/loss", "val/loss"} and all(map(math.isfinite, losses.values())), losses
    return built


def test_the_lists_cover_every_yaml():
    data = {p.stem for p in (CONFIGS / "data").glob("*.yaml")}
    assert data == set(DOWNLOADED) | set(MNIST_DATA) | set(DIGITS_DATA)
    assert {p.stem for p in (CONFIGS / "trainer").glob("*.yaml")} == {"auto", "cpu", "gpu", "ddp_cpu"}
    assert len(MODELS) >= len(VARIANTS)


def test_every_variant_key_has_its_own_yaml_naming_its_class():
    """A study names variants by key; the key's YAML must build that very class."""
    for key, cls in VARIANTS.items():
        assert class_path(key) == f"{cls.__module__}.{cls.__qualname__}", key


@pytest.mark.parametrize("model", MODELS)
def test_model_yaml_instantiates_and_trains_on_digits(model, workdir):
    built = fit_a_few_steps(args(CPU, yaml_of("model", model), DIGITS, extra=QUICK))
    assert f"{type(built.model).__module__}.{type(built.model).__qualname__}" == class_path(model)
    assert tuple(built.model.hparams.data_shape) == (1, 8, 8)  # linked from the DataModule
    assert list(workdir.iterdir()) == []  # fast_dev_run writes no checkpoint; no logger


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_conv_yaml_on_top_of_a_variant_builds_the_conv_network_and_trains(model, workdir):
    small = QUICK + ["--data.batch_size", "8", "--data.eval_batch_size", "8"]  # 13M parameters: small batches
    built = fit_a_few_steps(args(CPU, yaml_of("model", model), DIGITS, yaml_of("model", "conv"), extra=small))
    hp = built.model.hparams
    assert hp.network == "conv" and list(hp.hidden) == [128, 256, 512, 1024] and hp.latent_dim == 16
    assert any(isinstance(m, torch.nn.Conv2d) for m in built.model.encoder.modules())
    assert type(built.model) is VARIANTS[model]


@pytest.mark.parametrize("data", DIGITS_DATA)
def test_digits_data_yaml_instantiates_and_trains(data, workdir):
    built = fit_a_few_steps(args(CPU, yaml_of("model", "vae"), yaml_of("data", data), extra=QUICK))
    assert built.datamodule.hparams.dataset == "digits"
    assert built.datamodule.binary == (built.model.hparams.likelihood == "bernoulli")


@pytest.mark.parametrize("data", MNIST_DATA)
def test_mnist_data_yaml_trains_on_the_shared_pickle(data, mnist_pkl, workdir):
    extra = QUICK + ["--data.path", str(mnist_pkl)]
    built = fit_a_few_steps(args(CPU, yaml_of("model", "vae"), yaml_of("data", data), extra=extra))
    side = 32 if data == "mnist_rae" else 28  # the RAE protocol pads MNIST to 32x32
    assert tuple(built.model.hparams.data_shape) == (1, side, side)
    x = built.datamodule.splits["val"].x
    assert len(x) == 10_000 and x.shape[-2:] == (side, side)
    if side == 32:  # zero border, digits unchanged inside
        assert x[..., :2, :].abs().max() == 0 and x[..., 2:30, 2:30].abs().max() > 0


@pytest.mark.parametrize("data", sorted(DOWNLOADED))
def test_downloaded_data_yaml_instantiates_without_loading(data, workdir):
    built = build_cli(args(CPU, yaml_of("model", "vae"), yaml_of("data", data)), run=False, save_config_callback=None)
    assert built.datamodule.hparams.dataset == data
    assert built.datamodule.shape == DOWNLOADED[data] == tuple(built.model.hparams.data_shape)
    assert built.datamodule.splits == {} and list(workdir.iterdir()) == []  # nothing read, nothing fetched
    with torch.no_grad():  # the network fits the image size
        x = torch.rand(2, *DOWNLOADED[data])
        assert built.model.decode(built.model.posterior(x).rsample()).mean.shape == x.shape


def test_gpu_trainer_yaml_parses(monkeypatch):
    if torch.cuda.is_available():
        built = build_cli(args(yaml_of("trainer", "gpu"), yaml_of("model", "vae"), DIGITS), run=False,
                          save_config_callback=None)
        assert built.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return
    monkeypatch.setattr(LatentBenchCLI, "instantiate_classes", lambda self: None)  # no GPU: parse only
    parsed = build_cli(args(yaml_of("trainer", "gpu"), yaml_of("model", "vae"), DIGITS), run=False,
                       save_config_callback=None)
    assert parsed.config.trainer.accelerator == "gpu" and parsed.config.trainer.precision == "32-true"


def test_ddp_cpu_trainer_yaml_builds_a_two_process_spawn_trainer(workdir):
    built = build_cli(args(yaml_of("trainer", "ddp_cpu"), yaml_of("model", "vae"), DIGITS), run=False,
                      save_config_callback=None)
    trainer = built.trainer
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.strategy._start_method == "spawn"
    assert trainer.strategy.root_device.type == "cpu"


STUDIES = sorted((CONFIGS / "studies").glob("*.yaml"))


def seeded(args: list[str], seed: int) -> list[str]:
    """A run's tokens with ``seed`` for the run's and its split's seed."""
    return [json.dumps(seed) if i and args[i - 1] in ("--seed_everything", "--data.seed") else a
            for i, a in enumerate(args)]


@pytest.mark.parametrize("study_file", STUDIES, ids=lambda p: p.stem)
def test_study_yaml_expands_into_runs_whose_configs_parse(study_file, monkeypatch):
    from benchmark.spec import EvaluationConfig

    study = load_study(study_file)
    specs = expand(study, results_dir="r", work_dir="w", wandb="disabled")
    settings = sum(math.prod(len(v) for v in study.get("sweep", {}).get(variant, {}).values())
                   for variant in study["variants"])
    assert len(specs) == len(study["datasets"]) * settings * len(study["seeds"]) * len(study.get("budgets") or [1])
    assert len({s.name for s in specs}) == len(specs)
    monkeypatch.setattr(LatentBenchCLI, "instantiate_classes", lambda self: None)  # parse, check keys
    first_seed = {}  # a run's tokens under the study's first seed, by its name without the seed
    for spec in specs:
        assert isinstance(spec, RunSpec) and all(Path(f).is_file() for f in spec.config_files)
        assert class_path(spec.variant).rsplit(".", 1)[1] in {c.__name__ for c in VARIANTS.values()}
        EvaluationConfig(**spec.evaluation)
        if spec.seed != study["seeds"][0]:  # another seed's tokens differ only in the seeds checked below
            assert spec.cli_args() == seeded(first_seed[spec.name.rsplit("-s", 1)[0]], spec.seed)
            continue
        first_seed[spec.name.rsplit("-s", 1)[0]] = spec.cli_args()
        parsed = build_cli(spec.cli_args(), run=False, save_config_callback=None)
        assert parsed.config.model.class_path == class_path(spec.variant)
        assert parsed.config.seed_everything == spec.seed
        for key, value in spec.overrides.items():
            assert parsed.config[key] == value, key


# ------------------------------------------------------------------------------------------------------------
# The configs ship with the package: a study runs from any folder, with a user's own configs and variant
# ------------------------------------------------------------------------------------------------------------

USER_VARIANT = '''
from benchmark.latents import Diagonal
from benchmark.variants import KLRegularized


class HalfKLVAE(KLRegularized):
    """A user's variant, in a module outside the package: the VAE at half the KL weight."""

    def __init__(self, weight: float = 0.5, **kwargs):
        super().__init__(weight=weight, **kwargs)

    def make_posterior(self):
        return Diagonal()
'''


def user_study(folder: Path, variants: list[str], module: str, written: bool = True) -> Path:
    """A study in a folder of the user's: packaged trainer and dataset, the user's own variant config (its
    class in ``module``, a name no other test imports: an imported module stays in ``sys.modules``)."""
    (folder / "mine" / "model").mkdir(parents=True)
    (folder / "mine" / "model" / "half_kl.yaml").write_text(f"model:\n  class_path: {module}.HalfKLVAE\n")
    if written:
        (folder / f"{module}.py").write_text(USER_VARIANT)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "outside", "configs": "mine", "trainer": "cpu", "datasets": ["digits_binary"],
        "variants": variants, "seeds": [0],
        "overrides": {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
                      "trainer.enable_progress_bar": False},
        "evaluation": {"iw_samples": 5, "fid_samples": 0, "max_codes": 100, "expost_epochs": 1,
                       "gmm_components": 2}}))
    return path


def test_a_study_outside_the_repository_finds_the_packaged_configs_and_the_users_variant(tmp_path, monkeypatch):
    from benchmark.cli import run_main
    from benchmark.records import read_record

    monkeypatch.chdir(tmp_path)  # nothing of the repository's beside it
    path = user_study(tmp_path / "project", ["vae", "half_kl"], "outside_variants")
    specs = expand(load_study(path), results_dir="r", work_dir="w", wandb="disabled")
    packaged = {Path(f).resolve() for s in specs for f in s.config_files if "half_kl" not in f}
    assert packaged == {(CONFIGS / "trainer" / "cpu.yaml").resolve(), (CONFIGS / "data" / "digits_binary.yaml").resolve(),
                        (CONFIGS / "model" / "vae.yaml").resolve()}
    assert "outside_variants" not in __import__("sys").modules
    # two workers: a spawned process imports the user's module too
    assert run_main([str(path), "--results", "r", "--work-dir", "w", "--wandb", "disabled", "--devices", "2"]) == 0
    record = read_record(tmp_path / "r" / "runs" / "outside" / "digits_binary-half_kl-s0.json")
    assert record["status"] == "finished" and record["config"]["model"]["class_path"] == "outside_variants.HalfKLVAE"
    assert record["config"]["model"]["init_args"]["weight"] == 0.5
    assert str(tmp_path / "project") not in __import__("sys").path  # the study leaves the path as it was


def test_a_users_variant_module_that_does_not_import_stops_the_study_before_any_run(tmp_path, monkeypatch, capsys):
    from benchmark.cli import main

    monkeypatch.chdir(tmp_path)
    path = user_study(tmp_path / "project", ["vae", "half_kl"], "my_missing_variants", written=False)
    assert main(["run", str(path), "--results", "r", "--work-dir", "w", "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digits_binary-half_kl-s0" in err[0] and "No module named 'my_missing_variants'" in err[0]
    assert "next to the study YAML" in err[0]
    assert not (tmp_path / "r" / "runs").exists()  # the vae run before it did not train either


def test_a_packaged_study_runs_by_key_and_an_unknown_key_names_the_packaged_ones(tmp_path, monkeypatch):
    from benchmark.errors import UsageError
    from benchmark.study import study_file

    monkeypatch.chdir(tmp_path)
    assert study_file("quick") == (CONFIGS / "studies" / "quick.yaml").resolve()
    assert load_study("quick")["name"] == "quick"
    with pytest.raises(UsageError, match="packaged studies by key: .*quick"):
        study_file("quikc")


def test_the_wheel_ships_every_config(tmp_path):
    """A non-editable install has the configs: the wheel holds every YAML of configs/ under benchmark/configs/."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(CONFIGS.parent)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("latent_bench-*.whl")
    shipped = {n.removeprefix("benchmark/configs/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("benchmark/configs/") and n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml")}


# ------------------------------------------------------------------------------------------------------------
# The published-table study, dry-run on the CPU
# ------------------------------------------------------------------------------------------------------------

def test_the_rae_table_study_runs_every_model_at_its_authors_settings_at_a_tiny_budget(tmp_path, one_thread):
    """configs/studies/repro_rae_fid.yaml end to end at a tiny budget: the embedded digits padded to the
    protocol's 32x32, a narrow copy of its convolutional network, no FID (Inception is a GPU job). Each
    model trains with its own learning rate, weight and plateau schedule, and the leaderboard compares the
    study with the paper's rows."""
    from benchmark.cli import run_main
    from benchmark.leaderboard import write_leaderboard
    from benchmark.records import load_records
    from helpers import markdown_tables

    tiny = ["data.dataset=digits", "data.pad=12", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
            "model.init_args.hidden=[8, 8, 8, 8]", "evaluation.fid_samples=0", "evaluation.iw_samples=2",
            "evaluation.max_codes=100", "evaluation.gmm_components=2", "evaluation.expost_epochs=1"]
    sets = [arg for s in tiny for arg in ("--set", s)]
    study = CONFIGS / "studies" / "repro_rae_fid.yaml"
    assert run_main([str(study), "--results", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"),
                     "--wandb", "disabled", *sets]) == 0
    records = {r["variant"]: r for r in load_records(tmp_path / "r")}
    spec = yaml.safe_load(study.read_text())
    assert set(records) == set(spec["variants"]) and {r["status"] for r in records.values()} == {"finished"}
    for variant, r in records.items():
        init = r["config"]["model"]["init_args"]
        for key, value in spec["variant_overrides"][variant].items():
            assert init[key.rsplit(".", 1)[1]] == value, (variant, key)
        assert init["network"] == "conv" and init["data_shape"] == [1, 32, 32] and init["latent_dim"] == 16
    md = write_leaderboard(tmp_path / "r", references=CONFIGS.parent / "results" / "references.yaml")
    rows = markdown_tables(md.read_text())["Reproduction of published values",]
    gmm = {row["variant"]: row for row in rows if row["metric"] == "fid_gmm ↓"}
    assert set(gmm) == {"AE (ae)", "VAE (vae)", "CV-VAE (cv_vae)", "WAE (wae_mmd)", "RAE-L2 (rae)", "RAE (rae_plain)",
                        "RAE-GP (rae_gp)", "RAE-SN (rae_sn)"}
    rae = gmm["RAE-L2 (rae)"]
    assert (rae["study"], rae["reference"], rae["measured"]) == ("repro_rae_fid", "8.69", "–")  # no FID here
    assert "epochs 2 vs reference 100" in rae["note"]  # a dry run is never compared with the paper


# ------------------------------------------------------------------------------------------------------------
# The default trainer uses the hardware there is
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [0, 1])
def test_the_default_trainer_trains_on_a_gpu_where_one_is_visible_and_on_the_cpu_elsewhere(gpus, monkeypatch):
    """configs/trainer/auto.yaml (a study's trainer when it names none, and the GPU-sized studies') resolves
    to CUDA when the process sees a GPU, as each worker slot of ``--devices auto`` does, and to the CPU
    otherwise. The GPU count is mocked: no GPU is needed."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from benchmark.study import expand

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: gpus > 0))
    monkeypatch.setattr("lightning.fabric.accelerators.cuda.num_cuda_devices", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cli = build_cli(["--config", str(CONFIGS / "trainer" / "auto.yaml"), "--config", str(CONFIGS / "model" / "vae.yaml"),
                     "--config", str(CONFIGS / "data" / "digits.yaml")], run=False, save_config_callback=None)
    assert type(cli.trainer.accelerator) is (CUDAAccelerator if gpus else CPUAccelerator)
    study = {"name": "s", "configs": str(CONFIGS), "datasets": ["digits"], "variants": ["vae"], "seeds": [0]}
    (spec,) = expand(study, results_dir="r", work_dir="w", wandb="disabled")
    assert Path(spec.config_files[0]) == CONFIGS / "trainer" / "auto.yaml"  # a study that names no trainer
    for name in ("question_mnist_gpu", "question_mnist_continuous_gpu", "repro_rae_fid", "repro_pythae_vae", "quick"):
        assert load_study(CONFIGS / "studies" / f"{name}.yaml")["trainer"] == "auto", name


@pytest.mark.parametrize("folder", ["results/question/runs/question_mnist", "results/question/runs/latent_2d_mnist",
                                    "results/runs/repro_flax_vae"])
def test_the_committed_records_of_a_resumable_study_match_its_current_protocol(folder):
    """A rerun of these studies into their committed folder resumes the grid: each record's fingerprint is the
    one its study expands to today. A config edit that changes it (a trainer, a default) fails here, not as a
    'written by another protocol' refusal in a user's rerun."""
    records = sorted((REPO / folder).glob("*.json"))
    assert records, f"no records in {folder}"
    study = load_study(CONFIGS / "studies" / f"{Path(folder).name}.yaml")
    specs = {s.record_path.resolve(): s for s in expand(study, results_dir=str(REPO / Path(folder).parent.parent),
                                                       work_dir="unused", wandb="disabled")}
    for path in records:
        record, spec = json.loads(path.read_text()), specs.get(path.resolve())
        assert spec is not None, f"{path.name} is not a run of the study"
        assert record["spec_digest"] == spec.digest, (path.name, spec.differences(record["spec_protocol"]))


@pytest.mark.parametrize("folder", ["results", "results/question", "results/cpu_budget", "results/instruments"])
def test_the_committed_leaderboards_are_what_their_records_give(folder, tmp_path, monkeypatch):
    """The committed tables are the leaderboard of the committed records, regenerated by today's code: a record
    added without regenerating them, or a change to the tables' code, fails here (the plots are not compared:
    their pixels depend on matplotlib's version)."""
    import shutil

    from benchmark.leaderboard import plots, write_leaderboard

    monkeypatch.setattr(plots, "_save", lambda fig, path: path)  # the figures are drawn, not rendered to files
    shutil.copytree(REPO / folder / "runs", tmp_path / "runs")
    if (REPO / folder / "references.yaml").is_file():
        shutil.copy(REPO / folder / "references.yaml", tmp_path)
    write_leaderboard(tmp_path)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard_paired.csv"):
        assert (tmp_path / name).read_text() == (REPO / folder / name).read_text(), \
            f"{folder}/{name} is not its records' leaderboard: run latent-bench leaderboard {folder}"
