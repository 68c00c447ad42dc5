"""Evaluation cost: the evaluation / training ratio of a study's runs, and seconds per metric.

    python -m benchmark.perf.evaluation --data ../shared/data/mnist.pkl.gz \\
        --study configs/studies/seed_question_mnist_continuous.yaml --variants vae,ae_moments

Part 1 runs the study's own runs (its budget, seed 0, the named variants) exactly as ``latent-bench run``
does, into a scratch folder, and prints training seconds, evaluation seconds by phase (post-hoc posterior
fit, FID reference, GMM fit, the test pass) and evaluation / training. Part 2 times each metric alone on the
last trained model over the 10,000 test images: ELBO, IWAE at ``--iw-samples``, FID of prior samples with
each extractor (Inception only with ``--inception``), the Gaussianity battery.

With ``--profile CKPT`` it instead evaluates that run's checkpoint with the study's evaluation config under
``cProfile``, and prints the seconds of the phases that dominate: torch-fidelity's KID and precision/recall,
the importance-weighted likelihood, the post-hoc posterior's fit.

    python -m benchmark.perf.evaluation --study configs/studies/question_mnist.yaml --threads 1 \
        --profile runs/question_mnist/mnist_binary-vae-weight1-e10-s0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmark.errors import UsageError
from benchmark.evaluation import PosthocPosterior
from benchmark.metrics.extractors import build_feature_extractor
from benchmark.metrics.fid import FrechetDistanceToReference, reference_statistics
from benchmark.metrics.gaussianity import gaussianity
from benchmark.metrics.likelihood import elbo_terms, index_noise, iw_log_likelihood
from benchmark.runner import load_checkpoint, train_and_evaluate
from benchmark.study import expand, load_study, select


def study_runs(args, scratch: Path) -> list:
    """Train and evaluate seed 0 of each named variant at the study's budget; print the phases."""
    study = load_study(args.study)
    try:
        study = select(study, variants=args.variants, seeds=study["seeds"][0], datasets=study["datasets"][0])
    except UsageError as e:
        raise SystemExit(str(e)) from None
    overrides = {"trainer.enable_progress_bar": False, **({"data.path": args.data} if args.data else {}),
                 **({"trainer.max_epochs": args.epochs} if args.epochs else {})}
    specs = expand(study, scratch / "results", scratch / "runs", "disabled", overrides)
    print(f"Part 1: {study['name']} at its budget {study.get('evaluation', {})}")
    print(f"{'run':28s} {'train s':>8s} {'eval s':>7s} {'post-hoc':>8s} {'fid ref':>8s} {'gmm':>6s} {'test':>6s} "
          f"{'eval/train':>10s}")
    total_train = total_eval = 0.0
    for spec in specs:
        record = train_and_evaluate(spec)
        if record["status"] != "finished":
            raise SystemExit(f"{spec.name} {record['status']}: {record['reason']}")
        t = record["timings"]
        parts = t["evaluate_parts"]
        total_train, total_eval = total_train + t["train_s"], total_eval + t["evaluate_s"]
        print(f"{spec.name:28s} {t['train_s']:8.1f} {t['evaluate_s']:7.1f} {parts.get('posthoc_fit_s', 0):8.1f} "
              f"{parts.get('fid_reference_s', 0):8.1f} {parts.get('gmm_fit_s', 0):6.1f} {parts['test_pass_s']:6.1f} "
              f"{t['evaluate_s'] / t['train_s']:10.2f}", flush=True)
    print(f"{'all':28s} {total_train:8.1f} {total_eval:7.1f} {'':>38s} {total_eval / total_train:10.2f}")
    return specs


class Clock:
    def __init__(self, device):
        self.device = device

    def __call__(self, name, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.last = time.perf_counter() - start
        print(f"  {name:36s} {self.last:8.2f} s", flush=True)
        return out


def metric_timings(args, spec):
    """Each metric alone on the trained model of ``spec``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, data = load_checkpoint(spec.run_dir / "checkpoints" / "last.ckpt", map_location=device)
    model.eval()
    clock = Clock(device)
    print(f"\nPart 2: each metric alone on {spec.name} ({device})")
    x_test = data.splits["test"].x.to(device)
    x_test = torch.bernoulli(x_test, generator=torch.Generator(device).manual_seed(0)) if data.binary else x_test
    index = torch.arange(len(x_test))
    q = PosthocPosterior(model).to(device).eval()  # unfitted: the cost of the proposal, not its quality

    @torch.no_grad()
    def over_test(fn):
        return [fn(x_test[i: i + 1000], index[i: i + 1000]) for i in range(0, len(x_test), 1000)]

    d = model.hparams.latent_dim
    clock("elbo", lambda: over_test(lambda x, i: elbo_terms(x, q(x), model.decode, model.prior(x, x.shape[:1]),
                                                            index_noise(i, (d,), 0))))
    clock(f"nll_iw (K={args.iw_samples})", lambda: over_test(lambda x, i: iw_log_likelihood(
        x, q(x), model.decode, model.prior(x, x.shape[:1]), args.iw_samples,
        eps=index_noise(i, (args.iw_samples, d), 1))))
    x_train, y_train = data.grey["train"]
    extractors = {"domain": lambda: build_feature_extractor("domain", dataset=data.hparams.dataset,
                                                            train_images=x_train, train_labels=y_train)}
    if args.inception:
        extractors["inception"] = lambda: build_feature_extractor("inception", weights_path=args.inception)
    built = {}
    for name, build in extractors.items():
        extractor = built[name] = clock(f"fid {name}: extractor (cached after once)", lambda: build().to(device))
        # Inception at 299x299 is ~5 images/s on a laptop CPU: there it is timed on a subset, and the
        # 10k figure is a projection (the Frechet distance itself is milliseconds).
        n = args.fid_samples if name == "domain" or device.type == "cuda" else min(args.fid_samples, 200)

        @torch.no_grad()
        def features():
            for start in range(0, n, 500):
                extractor(model.sample(min(500, n - start)))

        clock(f"fid {name}: features of {n} prior samples", features)
        if n < args.fid_samples:
            print(f"  {'':36s} {clock.last * args.fid_samples / n:8.0f} s projected for {args.fid_samples}")
    domain = built["domain"]
    ref = reference_statistics(data.hparams.dataset, data.grey["test"][0], domain)

    @torch.no_grad()
    def fid():
        metric = FrechetDistanceToReference(domain, ref).to(device)
        for _ in range(0, args.fid_samples, 1000):
            metric.update(model.sample(1000))
        return float(metric.compute())

    clock(f"fid domain: whole metric, {args.fid_samples} samples", fid)
    with torch.no_grad():
        codes = torch.cat([model.posterior(x).mean for x in x_test.split(1000)])
    clock(f"gaussianity ({args.max_codes} codes)", lambda: gaussianity(codes[: args.max_codes].cpu()))


# (the end of a function's file path, its name) -> the phase it is, for --profile
PROFILED = {("torch_fidelity/metric_kid.py", "kid_features_to_metric"): "KID (torch-fidelity)",
            ("torch_fidelity/metric_prc.py", "prc_features_to_metric"): "precision/recall (torch-fidelity)",
            ("benchmark/metrics/likelihood.py", "iw_log_weights"): "importance-weighted likelihood",
            ("lightning/pytorch/trainer/trainer.py", "fit"): "post-hoc posterior fit"}


def profile_checkpoint(args):
    """Evaluate a checkpoint with the study's evaluation config under cProfile; print the dominant phases."""
    import cProfile
    import pstats

    from benchmark.runner import evaluate_checkpoint
    from benchmark.spec import EvaluationConfig

    cfg = EvaluationConfig(**{"seed": 0, **load_study(args.study).get("evaluation", {})})
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    evaluate_checkpoint(args.profile, cfg)
    profiler.disable()
    wall = time.perf_counter() - start
    seconds = dict.fromkeys(PROFILED.values(), 0.0)
    for (path, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        for (end, function), phase in PROFILED.items():
            if name == function and path.endswith(end):
                seconds[phase] += cumulative
    print("| phase | s | share |\n| --- | --- | --- |")
    for phase, s in [*seconds.items(), ("everything else", wall - sum(seconds.values())), ("evaluation", wall)]:
        print(f"| {phase} | {s:.1f} | {s / wall:.0%} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="mnist.pkl.gz or torchvision folder (default: download)")
    p.add_argument("--study", default="configs/studies/seed_question_mnist_continuous.yaml")
    p.add_argument("--variants", default="vae,ae_moments", help="variants of the study to run (seed 0)")
    p.add_argument("--epochs", type=int, default=None, help="override the study's epochs (default: its own)")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of part 2's IWAE timing")
    p.add_argument("--fid-samples", type=int, default=10_000)
    p.add_argument("--max-codes", type=int, default=10_000)
    p.add_argument("--inception", default=None, help="Inception weights file; times FID with Inception too")
    p.add_argument("--profile", default=None, metavar="CKPT", help="profile the evaluation of this checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch threads (a study's worker slot has cores/slots)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}")
    if args.profile:
        return profile_checkpoint(args)
    with tempfile.TemporaryDirectory() as scratch:
        specs = study_runs(args, Path(scratch))
        metric_timings(args, specs[-1])
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
