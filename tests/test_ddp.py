"""DDP over gloo on the CPU: a 2-process evaluation gives the 1-process values, and 2-process training splits
each epoch between the ranks.

Uses ``ddp_spawn`` in-process: a plain ``ddp`` launch would re-run pytest's command line in rank 1."""

import math

import lightning as L
import pytest
import torch

from benchmark.data import LatentDataModule
from benchmark.evaluation import EvaluationConfig, evaluate
from benchmark.variants import VARIANTS


def _evaluate(name, devices, cache):
    L.seed_everything(0)
    data = LatentDataModule("digits", binarize="dynamic", batch_size=64, eval_batch_size=37)
    model = VARIANTS[name](data_shape=data.shape, latent_dim=4, hidden=(64,))
    cfg = EvaluationConfig(iw_samples=20, fid_samples=300, max_codes=200, expost_epochs=0, gmm_components=3,
                           cache_dir=str(cache))

    def make_trainer(**kw):
        strategy = "ddp_spawn" if devices > 1 else "auto"
        return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)

    data.setup("fit")
    return evaluate(model, data, cfg, make_trainer)["metrics"]


@pytest.mark.parametrize("name", ["vae", "ae"])
def test_two_process_evaluation_equals_one_process(name, tmp_path):
    one = _evaluate(name, 1, tmp_path)
    two = _evaluate(name, 2, tmp_path)
    finite = {k: v for k, v in one.items() if math.isfinite(v)}
    assert set(two) == set(one)
    assert {"elbo_posthoc", "nll_iw", "nll_iw_k1", "nll_iw_k10", "nll_iw_k20", "fid_prior", "fid_gmm", "fid_recon",
            "gauss_kl", "prior_holes", "kid_prior", "precision_gmm", "recall_recon"} <= set(finite)
    assert ("elbo" in finite) is (name == "vae")  # the encoder's own ELBO: stochastic encoders only
    for key, value in finite.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_two_process_validation_loss_terms_equal_one_process():
    """The logged loss terms are reduced across processes, not rank 0's half of the split: 200 validation
    images in batches of 37 give the 1-process values on 2 processes."""
    logged = {}
    for devices in (1, 2):
        L.seed_everything(0)
        data = LatentDataModule("digits", binarize="dynamic", batch_size=64, eval_batch_size=37)
        model = VARIANTS["ae"](data_shape=data.shape, latent_dim=4, hidden=(64,))
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.validate(model, datamodule=data, verbose=False)
        logged[devices] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert set(logged[1]) == {"val/loss", "val/distortion", "val/regularizer"}
    assert logged[2] == pytest.approx(logged[1], rel=1e-5)


class _SeenIndices(L.Callback):
    """Saves the training indices each rank drew in each epoch (a ddp_spawn worker's state stays there)."""

    def __init__(self, folder):
        self.folder, self.seen = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch[2].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        torch.save(torch.cat(self.seen), self.folder / f"epoch{trainer.current_epoch}-rank{trainer.global_rank}.pt")
        self.seen = []


def test_two_process_training_splits_each_epoch_between_the_ranks_and_reshuffles(tmp_path):
    L.seed_everything(0)
    data = LatentDataModule("digits", binarize="dynamic", batch_size=64)
    model = VARIANTS["ae"](data_shape=data.shape, latent_dim=4, hidden=(64,))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[_SeenIndices(tmp_path)])
    trainer.fit(model, datamodule=data)
    per_rank = (1797 - 300 - 200) // 2 // 64 * 64  # the digits' training split, halved, whole batches
    epochs = []
    for epoch in range(2):
        ranks = [torch.load(tmp_path / f"epoch{epoch}-rank{r}.pt") for r in range(2)]
        assert [len(r) for r in ranks] == [per_rank, per_rank]
        both = torch.cat(ranks)
        assert len(both.unique()) == len(both)  # no image trained on by both ranks
        epochs.append(both)
    assert not torch.equal(epochs[0], epochs[1])  # Lightning set the sampler's epoch: a new order
