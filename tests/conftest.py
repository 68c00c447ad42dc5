"""Shared fixtures. Only the environment isolation is automatic; everything else is opt-in by name."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handlers bind the real stderr, not the capture of the first test)
import pytest

from benchmark.metrics import extractors

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
MNIST_PKL = SHARED / "data" / "mnist.pkl.gz"

ISOLATED_DIRS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "LATENT_BENCH_CACHE")


@pytest.fixture(autouse=True, scope="session")
def isolated_environment(tmp_path_factory):
    """W&B offline and every cache in a temporary folder, for the whole session (session scope, so
    module-scoped fixtures of other test files see it too): no test writes under the home folder or
    talks to a server."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        for name in ISOLATED_DIRS:
            mp.setenv(name, str(tmp_path_factory.mktemp(name.lower())))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: these tests use tiny tensors, and on a busy 2-core machine two
    intra-op threads wait on each other (indexing a 64-row batch measured 6 ms on two threads, 0.03 ms on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_dir() -> Path:
    return REPO


@pytest.fixture
def configs_dir() -> Path:
    return CONFIGS


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` beside the repository: files every developer and CI run has, never in git."""
    return SHARED


@pytest.fixture
def mnist_pkl() -> Path:
    """The real MNIST pickle from ``../shared/data``; the test is skipped where it is absent."""
    if not MNIST_PKL.is_file():
        pytest.skip(f"{MNIST_PKL} is absent (real MNIST lives in ../shared/data, outside the repository)")
    return MNIST_PKL


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current directory, so the relative ``runs/`` and ``results/`` the code writes land in tmp."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


class FlattenFeatures(extractors.FeatureExtractor):
    """Images (N, F, 1, 1) are their own features, so a test sets the feature distribution directly."""

    tag = "flatten"

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x.flatten(1)  # (N, F)
