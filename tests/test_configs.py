"""Every YAML under configs/ instantiates through the CLI and runs a few steps on the CPU.

Model YAMLs run on the embedded digits; the MNIST data YAMLs on ../shared's mnist.pkl.gz (skipped where it is
absent). Datasets that need a download (CIFAR-10, Fashion-MNIST, CelebA) are instantiated, not loaded.
``trainer/gpu.yaml`` is parsed only (no GPU here; instantiated too where one is). ``trainer/ddp_cpu.yaml`` is
instantiated but not run: a 2-process ``ddp_spawn`` fit costs a fresh Lightning import a rank, and the
two-process runs live in the metric tests.
"""

from __future__ import annotations

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
    assert {p.stem for p in (CONFIGS / "trainer").glob("*.yaml")} == {"cpu", "gpu", "ddp_cpu"}
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
    for spec in specs:
        assert isinstance(spec, RunSpec) and all(Path(f).is_file() for f in spec.config_files)
        assert class_path(spec.variant).rsplit(".", 1)[1] in {c.__name__ for c in VARIANTS.values()}
        EvaluationConfig(**spec.evaluation)
        parsed = build_cli(spec.cli_args(), run=False, save_config_callback=None)
        assert parsed.config.model.class_path == class_path(spec.variant)
        assert parsed.config.seed_everything == spec.seed
        for key, value in spec.overrides.items():
            assert parsed.config[key] == value, key
