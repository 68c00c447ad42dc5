"""The suite's pipeline against a peer implementation: the suite's VAE and pythae's VAE (Chadebec et al. 2022)
trained on one protocol, each scored by both estimators on the same test images.

    python -m benchmark.perf.peer_check --data mnist.pkl.gz [--seeds 0 1 2] [--epochs 10] [--k 200]
        [--out results/peer_pythae_vae.md]

The protocol is that of pythae's reproduction of the VAE row of Rezende & Mohamed 2015 (results/references.yaml,
id rezende2015-vae-nll) at a short budget: MNIST, statically binarised (the suite's ``mnist_static``: one seeded
Bernoulli draw of every split, 50k/10k/10k), 784-400-40 with one ReLU hidden layer in the encoder and the
decoder, a Bernoulli decoder, Adam at 1e-3, batch 100, ``--epochs`` epochs, no validation pass, no schedule.
Both sides train on the same binarised tensors of a seed (pythae gets the suite's training split as its
dataset) and are scored on the same binarised test images.

How pythae was matched: its encoder and decoder are user networks (pythae's documented way to set an
architecture) with the suite's layers, so the two sides share widths, activations and PyTorch's default
initialisation; they differ in what each library fixes:
- the posterior's scale: pythae's encoder outputs log sigma^2, the suite's softplus(s) + 1e-4;
- the decoder: pythae's ``bce`` loss takes probabilities (a sigmoid on the suite's logits), the suite's
  Bernoulli head takes logits;
- the data order: each library shuffles with its own generator (both seeded by the run's seed).

Estimators, both with the encoder's own q(z|x) as the proposal and K importance samples:
- the suite's ``iw_log_likelihood`` (and the ELBO ``elbo_terms``, one z per image, the KL in closed form);
- pythae's ``VAE.get_nll``, run on pythae's model and on the suite's model wrapped as a pythae ``VAE``.

Each seed's numbers are written to ``<out>.json`` as the seed ends, and a rerun of the same protocol keeps
them and trains only the seeds not saved; the table reports every saved seed, whether or not ``--seeds`` names
it. pythae is the optional extra ``latent-bench[pythae]``; without it the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

from benchmark.data import LatentDataModule, TensorImages
from benchmark.latents import standard_normal
from benchmark.leaderboard.tables import paired_difference, summarize
from benchmark.metrics.likelihood import elbo_terms, iw_log_likelihood
from benchmark.records import atomic_write
from benchmark.variants import VAE

try:  # the optional extra; without it main() says so before anything is built
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    HAVE_PYTHAE = True
except ImportError:
    ModelOutput, BaseEncoder, BaseDecoder, HAVE_PYTHAE = dict, nn.Module, nn.Module, False

SIDES = ("suite", "pythae")
SHAPE = (1, 28, 28)


def protocol(args) -> dict:
    return {"dataset": "mnist", "binarize": "static", "network": "mlp", "hidden": [400], "latent_dim": 40,
            "likelihood": "bernoulli", "optimizer": "Adam", "lr": 1e-3, "batch_size": 100, "epochs": args.epochs,
            "iw_samples": args.k, "test_images": "all 10,000 test images, binarised by the seed's draw"}


def binarised_mnist(path: str, seed: int, batch_size: int) -> LatentDataModule:
    data = LatentDataModule("mnist", path=path, binarize="static", batch_size=batch_size, seed=seed,
                            on_device=False)
    data.setup("fit")
    return data


def _trainer(epochs: int):
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its banner lines would bury the results
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0)


def train_suite(data: LatentDataModule, seed: int, epochs: int) -> tuple[VAE, float]:
    import lightning as L

    L.seed_everything(seed, verbose=False)
    model = VAE(data_shape=SHAPE, latent_dim=40, hidden=[400], likelihood="bernoulli", lr=1e-3)
    start = time.perf_counter()
    _trainer(epochs).fit(model, datamodule=data)
    return model.eval(), time.perf_counter() - start


class _Encoder(BaseEncoder):
    """pythae's encoder interface (embedding, log_covariance) over a network the suite would build."""

    def __init__(self, hidden: int, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), hidden), nn.ReLU())
        self.mean, self.log_var = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return ModelOutput(embedding=self.mean(h), log_covariance=self.log_var(h))


class _Decoder(BaseDecoder):
    def __init__(self, hidden: int, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(SHAPE)),
                                 nn.Unflatten(1, SHAPE))

    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))  # pythae's bce takes probabilities


class _SuiteEncoder(BaseEncoder):
    """The suite's trained encoder seen through pythae's interface: log sigma^2 of its diagonal posterior."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, x):
        q = self.model.posterior(x)
        return ModelOutput(embedding=q.mean, log_covariance=2 * q.stddev.log())


class _SuiteDecoder(BaseDecoder):
    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.model.decoder(z)))


def pythae_vae(encoder: nn.Module, decoder: nn.Module):
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig

    config = VAEConfig(input_dim=SHAPE, latent_dim=40, reconstruction_loss="bce")
    return PythaeVAE(config, encoder=encoder, decoder=decoder)


def train_pythae(x_train: torch.Tensor, seed: int, epochs: int):
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("pythae")]:
        logging.getLogger(name).setLevel(logging.WARNING)  # each pythae module logs to stdout at INFO
    torch.manual_seed(seed)
    model = pythae_vae(_Encoder(400, 40), _Decoder(400, 40))
    quiet = io.StringIO()  # pythae prints every epoch and draws progress bars
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        config = BaseTrainerConfig(output_dir=out, per_device_train_batch_size=100, num_epochs=epochs,
                                   learning_rate=1e-3, optimizer_cls="Adam", seed=seed, no_cuda=True)
        BaseTrainer(model, BaseDataset(x_train, torch.zeros(len(x_train))), training_config=config).train()
    return model.eval(), time.perf_counter() - start


def suite_estimates(x: torch.Tensor, posterior, decode, k: int, seed: int, batch: int = 500) -> tuple[float, float]:
    """(ELBO, NLL by L_K) in nats, means over the images ``x`` (N, 1, 28, 28), by the suite's estimators."""
    torch.manual_seed(seed)
    elbo, log_px = [], []
    with torch.no_grad():
        for xb in x.split(batch):
            q = posterior(xb)
            pz = standard_normal(q.mean.shape[-1], q.mean, q.mean.shape[:-1])
            distortion, rate = elbo_terms(xb, q, decode, pz)
            elbo.append(-(distortion + rate))
            log_px.append(iw_log_likelihood(xb, q, decode, pz, k))
    return torch.cat(elbo).mean().item(), -torch.cat(log_px).mean().item()


def pythae_estimate(model, x: torch.Tensor, k: int, seed: int) -> float:
    """NLL in nats by pythae's ``get_nll`` (K samples a image, one image at a time, as pythae runs it)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return -float(model.get_nll(x, n_samples=k, batch_size=k))


def pythae_as_suite(model):
    """pythae's trained VAE as the suite's estimators see a model: q(z|x) and p(x|z) as distributions."""
    def posterior(x):
        out = model.encoder(x)
        return Independent(Normal(out.embedding, (0.5 * out.log_covariance).exp()), 1)

    def decode(z):
        lead = z.shape[:-1]
        p = model.decoder(z.reshape(-1, z.shape[-1]))["reconstruction"]
        return Independent(Bernoulli(probs=p.reshape(*lead, *SHAPE).clamp(1e-7, 1 - 1e-7)), 3)

    return posterior, decode


def run_seed(args, seed: int) -> dict[str, dict]:
    data = binarised_mnist(args.data, seed, batch_size=100)
    if args.limit_train:  # a dry run: the first N training images
        data.splits["train"] = TensorImages(data.splits["train"].x[: args.limit_train],
                                            data.splits["train"].y[: args.limit_train])
    x_train, x_test = data.splits["train"].x, data.splits["test"].x
    if args.limit_test:
        x_test = x_test[: args.limit_test]
    suite, suite_s = train_suite(data, seed, args.epochs)
    peer, peer_s = train_pythae(x_train, seed, args.epochs)
    suite_in_pythae = pythae_vae(_SuiteEncoder(suite), _SuiteDecoder(suite)).eval()
    out = {}
    for side, model, seconds, views in (("suite", suite, suite_s, ((suite.posterior, suite.decode), suite_in_pythae)),
                                        ("pythae", peer, peer_s, (pythae_as_suite(peer), peer))):
        (posterior, decode), as_pythae = views
        elbo, nll = suite_estimates(x_test, posterior, decode, args.k, seed)
        out[side] = {"train_s": seconds, "elbo": elbo, "nll_suite": nll,
                     "nll_pythae": pythae_estimate(as_pythae, x_test, args.k, seed)}
        print(f"seed {seed} {side:6s}: trained in {seconds:.0f} s, ELBO {elbo:.2f}, NLL {nll:.2f} (suite's "
              f"estimator), {out[side]['nll_pythae']:.2f} (pythae's)", flush=True)
    return out


def report(rows: dict[int, dict[str, dict]], proto: dict) -> str:
    lines = ["# The suite's VAE against pythae's on one protocol", "",
             "Written by `python -m benchmark.perf.peer_check` (see its docstring for how pythae was matched).", "",
             "Protocol: " + ", ".join(f"{k} {v}" for k, v in proto.items()) + ".", "",
             "## Per seed", "",
             "NLL in nats by K importance samples of the encoder's own q(z|x); ELBO one z per image, KL in closed "
             "form; train_s the wall time of training on this machine.", "",
             "| seed | implementation | train_s | ELBO ↑ | NLL, suite's estimator ↓ | NLL, pythae's get_nll ↓ |",
             "|---|---|---|---|---|---|"]
    for seed, sides in sorted(rows.items()):
        for side in SIDES:
            r = sides[side]
            lines.append(f"| {seed} | {side} | {r['train_s']:.0f} | {r['elbo']:.2f} | {r['nll_suite']:.2f} | "
                         f"{r['nll_pythae']:.2f} |")
    lines += ["", "## Suite − pythae, paired by seed", "",
              "mean ± 95% CI half-width (Student t) (seeds with the sign of the mean / seeds); the difference "
              "lies within seed noise when the interval holds 0.", "",
              "| metric | suite | pythae | suite − pythae | within seed noise |", "|---|---|---|---|---|"]
    for metric in ("elbo", "nll_suite", "nll_pythae", "train_s"):
        values = {side: {seed: sides[side][metric] for seed, sides in rows.items()} for side in SIDES}
        diff = paired_difference(values["suite"], values["pythae"])
        stats = [summarize(values[side].values()) for side in SIDES]
        within = "n/a" if diff is None or math.isnan(diff.ci95) else \
            ("yes" if abs(diff.mean) <= diff.ci95 else "no")
        lines.append(f"| {metric} | {stats[0].cell()} | {stats[1].cell()} | "
                     f"{diff.cell() if diff else '–'} | {within} |")
    gaps = [abs(sides[side]["nll_suite"] - sides[side]["nll_pythae"]) for sides in rows.values() for side in SIDES]
    lines += ["", f"The two estimators on the same model differ by at most {max(gaps):.3f} nats "
                  f"(mean {sum(gaps) / len(gaps):.3f}) over the {len(gaps)} models.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.perf.peer_check", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="MNIST file or folder (as data.path)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--k", type=int, default=200, help="importance samples a test image")
    parser.add_argument("--limit-train", type=int, default=0, help="train on the first N images only (0: all)")
    parser.add_argument("--limit-test", type=int, default=0, help="score only the first N test images (0: all)")
    parser.add_argument("--out", default="results/peer_pythae_vae.md")
    args = parser.parse_args(argv)
    if not HAVE_PYTHAE:
        print("peer_check: pythae is not installed, nothing was run; pip install 'latent-bench[pythae]'",
              file=sys.stderr)
        return 2
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: train at least 1 epoch")
    if args.k < 1:
        parser.error(f"--k {args.k}: the estimators need at least 1 importance sample")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice; give each once")
    proto = protocol(args)
    if args.limit_train:
        proto["train_images"] = f"the first {args.limit_train} training images"
    if args.limit_test:
        proto["test_images"] = f"the first {args.limit_test} test images"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = out.with_suffix(".json")
    rows = {}
    if saved.is_file():  # every seed an earlier run of the same protocol saved is kept, and reported
        earlier = json.loads(saved.read_text())
        if earlier.get("protocol") == proto:
            rows = {int(seed): sides for seed, sides in earlier["seeds"].items()}
            if done := sorted(set(rows) & set(args.seeds)):
                print(f"peer_check: seeds {done} already done in {saved}")
            if others := sorted(set(rows) - set(args.seeds)):
                print(f"peer_check: seeds {others} of {saved} are reported too")
    for seed in [s for s in args.seeds if s not in rows]:
        rows[seed] = run_seed(args, seed)
        atomic_write(saved, json.dumps({"protocol": proto, "seeds": rows}, indent=2))
    atomic_write(out, report(rows, proto))
    print(f"peer_check: wrote {out} and {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
