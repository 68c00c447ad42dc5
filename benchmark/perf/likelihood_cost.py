"""Cost of each likelihood head's log p(x|z) against the decoder that feeds it, side by side in one run:
interleaved rounds, medians.

    python -m benchmark.perf.likelihood_cost --data ../shared/data/mnist.pkl.gz --batch 1024 --rounds 15

For a batch of MNIST-sized images (real test images with ``--data``, else random images on the 256-level
grid) it times the MLP decoder 16-500-500-784 and, for every registered head, ``log_prob`` under no_grad
(what the importance-weighted evaluation runs) and forward + backward with a learned scale (what training
runs), then prints each head's ratio to the decoder forward (``fwd/dec``) and to the decoder's own forward +
backward (``train/dec``). ``--samples K`` scores K decoded samples a data image (locations (K, B, ...), data
(B, ...)), as the importance-weighted estimate does. ``--threads`` sets torch's intra-op threads: on a busy
machine two threads that wait on each other inflate every elementwise op, so compare ratios within a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmark.likelihoods import LIKELIHOODS, make_likelihood
from benchmark.nets import mlp_decoder

SHAPE = (1, 28, 28)
LATENT, HIDDEN = 16, (500, 500)
LEVELS, SIGMA = 256, 0.1


def images(n: int, data: Path | None) -> torch.Tensor:
    """(n, 1, 28, 28) images on the 256-level grid: MNIST test images, or uniform random levels."""
    if data is not None:
        from benchmark.data import load_mnist

        x = load_mnist(data.parent, data)[2]
        return x[torch.arange(n) % len(x)]
    return torch.randint(0, LEVELS, (n, *SHAPE), generator=torch.Generator().manual_seed(0)) / (LEVELS - 1)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(fn, device, repeat: int) -> float:
    """Seconds per call, the mean of ``repeat`` back-to-back calls."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeat


def cases(x: torch.Tensor, samples: int, device: torch.device) -> dict[str, callable]:
    """name -> a closure that runs one measured step."""
    torch.manual_seed(0)
    decoder = mlp_decoder(LATENT, SHAPE, HIDDEN).to(device)
    n = samples * len(x)
    z = torch.randn(n, LATENT, device=device)
    shape = (samples, len(x), *SHAPE) if samples > 1 else (len(x), *SHAPE)
    with torch.no_grad():
        # decoded locations near the data, as a trained decoder gives them: the heads' cost does not depend on
        # the values, but an untrained decoder's outputs would all sit in one branch
        loc = (x + 0.05 * torch.randn(shape, device=device)).clamp(-0.2, 1.2).reshape(shape)
        logits = torch.logit(loc.clamp(0.01, 0.99))
    binary = (x > 0.5).to(x.dtype)

    def decode():
        with torch.no_grad():
            decoder(z)

    def decode_train():
        decoder(z).sum().backward()

    out = {"decoder fwd": decode, "decoder fwd+bwd": decode_train}
    for name in LIKELIHOODS:
        head = make_likelihood(name, sigma=SIGMA, learn_sigma=True, levels=LEVELS).to(device)
        value = binary if name == "bernoulli" else x
        param = logits if name == "bernoulli" else loc

        def forward(head=head, param=param, value=value):
            with torch.no_grad():
                head(param).log_prob(value)

        def train(head=head, param=param, value=value):
            p = param.detach().requires_grad_()
            head(p).log_prob(value).sum().backward()

        out[f"{name} fwd"], out[f"{name} fwd+bwd"] = forward, train
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="mnist.pkl.gz (default: random grid images)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--samples", type=int, default=1, help="decoded samples per image (importance sampling)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--repeat", type=int, default=3, help="calls per timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = images(args.batch, args.data).to(device)
    steps = cases(x, args.samples, device)
    for fn in steps.values():  # warm-up: allocator, lazy initialisation
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved: drift in the machine's load hits every case alike
        for name, fn in steps.items():
            times[name].append(timer(fn, device, args.repeat))
    med = {name: statistics.median(t) for name, t in times.items()}
    dec, dec_train = med["decoder fwd"], med["decoder fwd+bwd"]
    print(f"batch {args.batch} x {args.samples} samples of {SHAPE}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.repeat} calls, medians")
    print(f"{'':24s}{'fwd ms':>9s}{'fwd+bwd ms':>12s}{'fwd/dec':>9s}{'train/dec':>11s}")
    print(f"{'decoder 16-500-500-784':24s}{1e3 * dec:9.1f}{1e3 * dec_train:12.1f}{1.0:9.2f}{1.0:11.2f}")
    for name in LIKELIHOODS:
        f, t = med[f"{name} fwd"], med[f"{name} fwd+bwd"]
        print(f"{name:24s}{1e3 * f:9.1f}{1e3 * t:12.1f}{f / dec:9.2f}{t / dec_train:11.2f}")


if __name__ == "__main__":
    main()
