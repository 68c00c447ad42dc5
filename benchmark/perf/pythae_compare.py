"""pythae's trainer on the throughput benchmark's MLP models (pythae is an optional extra, imported only here).

The networks are the suite's: 784-500-500 ReLU encoder with mean and log-variance heads (the mean only for
the AE), 20-500-500-784 decoder ending in a sigmoid (pythae's ``bce`` loss takes probabilities). pythae
indexes its dataset one item at a time and collates on the host, as its users run it; the data are
binarised once, since pythae has no dynamic binarisation (a per-batch ``torch.bernoulli`` is negligible).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import tempfile
import time

import torch
from pythae.data.datasets import BaseDataset
from pythae.models import AE, VAE, AEConfig, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.trainers import BaseTrainer, BaseTrainerConfig
from pythae.trainers.training_callbacks import TrainingCallback
from torch import nn

from benchmark.nets import mlp, mlp_decoder
from benchmark.perf.throughput import MODELS, make_model


class _Encoder(BaseEncoder):
    def __init__(self, shape, latent_dim: int, hidden, variational: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), mlp([math.prod(shape), *hidden]), nn.ReLU())
        self.mean = nn.Linear(hidden[-1], latent_dim)
        self.log_var = nn.Linear(hidden[-1], latent_dim) if variational else None

    def forward(self, x):
        h = self.body(x)
        out = ModelOutput(embedding=self.mean(h))
        if self.log_var is not None:
            out["log_covariance"] = self.log_var(h)
        return out


class _Decoder(BaseDecoder):
    def __init__(self, shape, latent_dim: int, hidden):
        super().__init__()
        self.net = nn.Sequential(mlp_decoder(latent_dim, shape, hidden), nn.Sigmoid())  # the suite's decoder

    def forward(self, z):
        return ModelOutput(reconstruction=self.net(z))


class _EpochTimer(TrainingCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_epoch_begin(self, training_config, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, training_config, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def pythae_throughput(name: str, x: torch.Tensor, epochs: int, batch_size: int, device) -> float | None:
    """Training images/s of pythae's ``BaseTrainer`` after its first epoch; None for models it lacks here."""
    shape = tuple(x.shape[1:])
    hp = make_model(name, shape).hparams  # the suite's model of that name: its network, widths and latent size
    if hp.network != "mlp":
        print(f"  pythae: {name} skipped (only the MLP is built here)")
        return None
    for logger in [n for n in logging.root.manager.loggerDict if n.startswith("pythae")]:
        logging.getLogger(logger).setLevel(logging.WARNING)  # each pythae module logs to stdout at INFO
    torch.manual_seed(0)
    variational = MODELS[name][0] == "vae"
    config_cls, model_cls = (VAEConfig, VAE) if variational else (AEConfig, AE)
    kwargs = {"reconstruction_loss": "bce"} if variational else {}
    config = config_cls(input_dim=shape, latent_dim=hp.latent_dim, **kwargs)
    model = model_cls(config, encoder=_Encoder(shape, hp.latent_dim, hp.hidden, variational),
                      decoder=_Decoder(shape, hp.latent_dim, hp.hidden))
    data = torch.bernoulli(x.float().cpu())
    n = len(data) // batch_size * batch_size
    timer = _EpochTimer()
    quiet = io.StringIO()  # pythae prints every epoch and draws progress bars
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        training = BaseTrainerConfig(output_dir=out, per_device_train_batch_size=batch_size, num_epochs=epochs,
                                     learning_rate=hp.lr, no_cuda=device.type != "cuda")
        trainer = BaseTrainer(model, BaseDataset(data[:n], torch.zeros(n)), training_config=training,
                              callbacks=[timer])
        trainer.train()
    return n / statistics.median(timer.times[1:])
