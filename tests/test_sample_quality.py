"""Invariants of KID and precision/recall (benchmark.metrics.sample_quality) on synthetic features."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmark.metrics import fid
from benchmark.metrics import sample_quality as sq
from helpers import free_port
from conftest import FlattenFeatures


def gaussian(n, d=8, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def mixture(n, means, seed=0):
    """n points (N, D) from equal-weight blobs of scale 0.3 around `means` (K, D)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(means), (n,), generator=g)
    return means[labels] + 0.3 * torch.randn(n, means.shape[1], generator=g, dtype=torch.float64)


MEANS = 10.0 * torch.eye(5, 6, dtype=torch.float64)  # five modes 10 apart


def unbiased_mmd2_cubic(x, y):
    """Binkowski et al. (2018) Eq. 4 with k(a, b) = (a.b / d + 1)^3, written out: the reference value."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
    off = 1 - torch.eye(m, dtype=x.dtype)
    return float((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_of_one_subset_equals_the_unbiased_mmd2_written_out():
    x, y = gaussian(300, seed=1), gaussian(300, shift=0.3, seed=2)
    assert sq.kid_features_to_metric(x, y, subsets=1, subset_size=300) == pytest.approx(
        unbiased_mmd2_cubic(x, y), rel=1e-9)


def test_kid_is_unbiased_zero_for_one_distribution_and_positive_for_shifted_ones():
    real = gaussian(2000, seed=0)
    same = [sq.kid_features_to_metric(sq.standardize(gaussian(200, seed=s), real), sq.standardize(
        gaussian(200, seed=100 + s), real), subsets=10, subset_size=200, seed=s) for s in range(1, 21)]
    shifted = [sq.kid_features_to_metric(sq.standardize(gaussian(200, shift=0.5, seed=s), real), sq.standardize(
        gaussian(200, seed=100 + s), real), subsets=10, subset_size=200, seed=s) for s in range(1, 21)]
    # unbiased: single draws straddle 0 and their mean is 0 within its standard error
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert min(shifted) > 10 * np.std(same)


def test_kid_of_a_set_against_itself_vanishes_as_1_over_m():
    """With Y = X the unbiased estimate is (2/m)(mean_{i!=j} k(x_i, x_j) - mean_i k(x_i, x_i)): slightly
    negative, the diagonal pairs counted across but not within, and zero as m grows."""
    values = []
    for m in (250, 1000):
        x = gaussian(m)
        kxx = (x @ x.T / x.shape[1] + 1) ** 3
        off = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        kid = sq.kid_features_to_metric(x, x, subsets=1, subset_size=m)
        assert kid == pytest.approx(float(2 / m * (off - kxx.diagonal().mean())), rel=1e-9)
        values.append(kid)
    assert values[0] < values[1] < 0 and values[0] / values[1] == pytest.approx(4, rel=0.2)


def test_precision_and_recall_are_one_for_identical_sets_and_recall_drops_with_missing_modes():
    real = mixture(1000, MEANS, seed=0)
    assert sq.prc_features_to_metric(real, real) == (1.0, 1.0)
    all_modes, three_modes = mixture(1000, MEANS, seed=1), mixture(1000, MEANS[:3], seed=1)
    precision_all, recall_all = sq.prc_features_to_metric(all_modes, real)
    precision, recall = sq.prc_features_to_metric(three_modes, real)
    assert recall_all > 0.8 and recall == pytest.approx(0.6, abs=0.05)  # 2 of the 5 real modes are missed
    assert precision > 0.8 and precision_all > 0.8  # what is generated still lies on the real modes
    out = sq.sample_quality_from_features(three_modes, real, kid_subsets=5)
    assert out[sq.RECALL] == pytest.approx(0.6, abs=0.05) and out[sq.KID] > 0.1


def test_values_equal_torch_fidelitys_own_on_the_standardised_features():
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = mixture(600, MEANS, seed=0), mixture(500, MEANS[:4], seed=1) + 0.2
    ours = sq.sample_quality_from_features(fake, real, seed=3, kid_subsets=10)
    f, r = sq.standardize(fake, real), sq.standardize(real, real)
    r_prc = r[torch.randperm(600, generator=torch.Generator().manual_seed(3))[:500]]
    theirs = prc_features_to_metric(f.float(), r_prc.float(), prc_neighborhood=3, verbose=False)  # full matrices
    assert ours[sq.PRECISION] == theirs["precision"] and ours[sq.RECALL] == theirs["recall"]
    kid = kid_features_to_metric(f, r, kid_subsets=10, kid_subset_size=500, rng_seed=3, verbose=False)
    assert ours[sq.KID] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-12)


def test_standardisation_keeps_dead_features_finite():
    real = torch.cat([gaussian(100), torch.zeros(100, 1, dtype=torch.float64)], 1)
    fake = torch.cat([gaussian(100, seed=1), torch.ones(100, 1, dtype=torch.float64)], 1)
    assert torch.isfinite(sq.standardize(fake, real)).all()
    assert sq.standardize(real, real).pow(2).mean() == pytest.approx(1.0, rel=0.02)  # one scale: unit mean variance


def test_a_nearly_dead_real_feature_does_not_dominate_kid():
    """A feature active in 1 of 1000 real images is a real feature of the data, not a unit of measurement: a
    sample set that lights it up moderately must not score worse than one shifted in every feature."""
    d = 8
    real = gaussian(1000, d=d, seed=0)
    rare = torch.zeros(1000, 1, dtype=torch.float64)
    rare[0] = 0.1  # its standard deviation is 0.003
    real = torch.cat([real, rare], 1)
    lit = torch.cat([gaussian(1000, d=d, seed=1), torch.full((1000, 1), 0.3, dtype=torch.float64)], 1)
    shifted = torch.cat([gaussian(1000, d=d, shift=0.5, seed=2), torch.zeros(1000, 1, dtype=torch.float64)], 1)

    def kid(fake):
        return sq.kid_features_to_metric(sq.standardize(fake, real), sq.standardize(real, real), subsets=20)

    assert kid(lit) < kid(shifted)
    assert kid(lit) < 0.1  # per-feature scaling made this feature 100 standard deviations off: KID in the 1000s


def _metric(reference_features, capacity=10_000):
    extractor = FlattenFeatures(reference_features.shape[1])
    reference = fid.images_to_reference_statistics(reference_features[:, :, None, None].float(), extractor)
    return sq.SampleQuality(extractor, reference, reference_features, capacity=capacity, seed=0, kid_subsets=5)


def test_batch_size_and_capacity():
    real, fake = mixture(400, MEANS, seed=0).float(), mixture(300, MEANS[:3], seed=1).float()
    images, index = fake[:, :, None, None], torch.arange(300)
    whole, ones = _metric(real), _metric(real)
    whole.update(images, index)
    for i in range(300):
        ones.update(images[i:i + 1], index[i:i + 1])
    a, b = whole.compute(), ones.compute()
    assert a == pytest.approx(b, rel=1e-6)
    assert a[sq.FID] == pytest.approx(fid.frechet_distance(images, real[:, :, None, None], FlattenFeatures(6)),
                                      rel=1e-6)
    capped = _metric(real, capacity=100)
    capped.update(images.flip(0), index.flip(0))  # the kept samples are the first 100 by index, in any order
    out = capped.compute()
    expected = sq.sample_quality_from_features(fake[:100], real, kid_subsets=5)
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-9)


def _on_rank(rank: int, world_size: int, port: int, real, fake, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = _metric(real)
        index = torch.arange(len(fake))[rank::world_size]  # interleaved shards of unequal size
        for i in index.split(37):
            metric.update(fake[i][:, :, None, None], i)
        torch.save(metric.compute(), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_give_the_single_process_values(tmp_path):
    real, fake = mixture(400, MEANS, seed=0).float(), mixture(301, MEANS[:4], seed=1).float()
    single = _metric(real)
    single.update(fake[:, :, None, None], torch.arange(301))
    expected = single.compute()
    port = free_port()
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_on_rank, args=(2, port, real, fake, tmp_path), nprocs=2, start_method=start_method)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == pytest.approx(expected, rel=1e-6)


def test_extractor_check_corrupts_as_named_and_judges_monotonicity():
    from benchmark.perf import extractor_check as check

    g = torch.Generator().manual_seed(0)
    pool = torch.rand(400, 1, 8, 8, generator=g), torch.arange(400) % 10
    rows = check.corrupted_sets(pool, 100, seed=0)
    by = {(family, strength): x for family, _, strength, x in rows}
    clean = by[("clean", 0.0)]
    assert torch.equal(by[("dim", 0.5)], clean * 0.5)
    assert ((by[("salt", 0.1)] == 1) & (clean != 1)).float().mean() == pytest.approx(0.1, abs=0.03)
    kept = [x for family, _, k, x in rows if family == "drop" and k == 5][0]
    match = (kept[:, None] == pool[0][None]).flatten(2).all(2).float().argmax(1)  # (100,) pool rows
    assert len(kept) == 100 and len(pool[1][match].unique()) == 5
    results = [{"family": f, "strength": s, "fid": s, "kid": s, "precision": 1 - s, "recall": 1.0}
               for f, _, s, _ in rows]
    verdict = check.monotone(results)
    assert all(verdict["noise"].values())
    results[1]["fid"] = -1.0  # the weakest noise better than clean
    assert not check.monotone(results)["noise"]["fid"]


def test_a_set_too_small_for_k_nearest_neighbours_reports_nan_not_an_error():
    metric = _metric(mixture(100, MEANS).float())
    metric.update(torch.zeros(3, 6, 1, 1), torch.arange(3))
    out = metric.compute()
    assert np.isfinite(out[sq.FID]) and all(np.isnan(out[k]) for k in (sq.KID, sq.PRECISION, sq.RECALL))
