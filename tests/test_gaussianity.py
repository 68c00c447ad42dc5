"""The Gaussianity battery against known answers: N(0, I) passes, each departure is flagged, p-values are
calibrated, closed forms are matched, and the Metric equals the pure function however it is fed."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_cat

from benchmark.metrics import gaussianity as G
from benchmark.metrics import keys

N = 2000


pytestmark = pytest.mark.usefixtures("one_thread")  # small pairwise blocks: one torch thread is faster


def codes(kind: str, n: int = N, d: int = 8, seed: int = 0, shift: float = 0.5) -> torch.Tensor:
    """Seeded codes (n, d): N(0, I) or one departure from it."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "null":
        return e
    if kind == "shifted":
        return e + shift
    if kind == "wide":  # 3x the prior's scale
        return 3 * e
    if kind == "correlated":  # unit variances, correlation 0.7
        corr = torch.full((d, d), 0.7, dtype=torch.float64).fill_diagonal_(1.0)
        return e @ torch.linalg.cholesky(corr).T
    if kind == "student_t":  # 5 dof, rescaled to unit variance: only the tails differ
        chi2 = torch.randn(n, 5, generator=g, dtype=torch.float64).pow(2).sum(1, keepdim=True)
        return e / (chi2 / 5).sqrt() * math.sqrt(3 / 5)
    if kind == "mixture":  # 1/2 N(0.8 * 1, 0.36 I) + 1/2 N(-0.8 * 1, 0.36 I): unit marginal variances
        sign = torch.randint(0, 2, (n, 1), generator=g).double() * 2 - 1
        return 0.8 * sign + 0.6 * e
    if kind == "low_rank":  # a 2-dimensional plane through the origin
        w = torch.randn(2, d, generator=g, dtype=torch.float64)
        return e[:, :2] @ (w / w.norm(dim=0))
    raise ValueError(kind)


def with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int = N, seed: int = 0) -> torch.Tensor:
    """Codes whose sample mean and (n - 1)-normalised sample covariance are exactly ``mean`` and ``cov``."""
    e = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    e = e - e.mean(0)
    e = e @ torch.linalg.inv(torch.linalg.cholesky(e.T @ e / (n - 1))).T  # sample covariance I
    return mean + e @ torch.linalg.cholesky(cov).T


def random_cov(d: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def null_battery():
    return G.gaussianity(codes("null"), mu=codes("null"))


# --- N(0, I) passes ---------------------------------------------------------------------------------------

def test_standard_normal_codes_score_near_zero(null_battery):
    r = null_battery
    assert set(r) == {keys.GAUSS_KL, keys.GAUSS_MMD, keys.GAUSS_SWD, keys.MARDIA_SKEW, keys.MARDIA_KURT,
                      keys.MARDIA_SKEW_P, keys.MARDIA_KURT_P, keys.HZ_STAT, keys.HZ_P, keys.KS_FRAC,
                      keys.PRIOR_HOLES, keys.KNN_KL, keys.ACTIVE_UNITS, keys.TOTAL_CORRELATION,
                      keys.GAUSS_KL_NULL, keys.TOTAL_CORRELATION_NULL, keys.CODES_N, keys.PRIOR_HOLES_FIT_N}
    assert all(math.isfinite(v) for v in r.values())
    # bounds are several standard errors at N = 2000, D = 8 (e.g. E gauss_kl ~ D(D+1)/(4N) = 0.009)
    assert 0 <= r[keys.GAUSS_KL] < 0.04
    assert abs(r[keys.GAUSS_MMD]) < 1e-3
    assert r[keys.GAUSS_SWD] < 0.08
    assert abs(r[keys.MARDIA_SKEW]) < 0.5
    assert r[keys.MARDIA_KURT] < 10  # against D(D+2) = 80
    assert abs(r[keys.KNN_KL]) < 0.06
    assert r[keys.TOTAL_CORRELATION] < 0.03
    assert r[keys.PRIOR_HOLES] < 0.03
    assert r[keys.KS_FRAC] >= 0.75
    assert min(r[keys.MARDIA_SKEW_P], r[keys.MARDIA_KURT_P], r[keys.HZ_P]) > 1e-3
    assert r[keys.ACTIVE_UNITS] == 8
    assert (r[keys.CODES_N], r[keys.PRIOR_HOLES_FIT_N]) == (N, N // 2)
    # the plug-in estimates sit at their own null value, within a few of its standard errors
    assert abs(r[keys.GAUSS_KL] - r[keys.GAUSS_KL_NULL]) < 0.015
    assert abs(r[keys.TOTAL_CORRELATION] - r[keys.TOTAL_CORRELATION_NULL]) < 0.015


# --- each departure from N(0, I) is flagged ---------------------------------------------------------------

# how much above the N(0, I) value counts as clearly flagged (tens of null standard errors)
MARGIN = {keys.GAUSS_KL: 0.2, keys.GAUSS_MMD: 2e-3, keys.GAUSS_SWD: 0.1, keys.KNN_KL: 0.2,
          keys.MARDIA_SKEW: 5.0, keys.MARDIA_KURT: 20.0, keys.TOTAL_CORRELATION: 0.2, keys.PRIOR_HOLES: 0.1}
K = keys
FLAGGED_BY = {
    "shifted": [K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.MARDIA_SKEW, K.MARDIA_KURT, K.KS_FRAC],
    "wide": [K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.MARDIA_KURT, K.KS_FRAC],
    "correlated": [K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.TOTAL_CORRELATION, K.PRIOR_HOLES],
    # moments up to 2 match N(0, I): the fitted Gaussian cannot see the tails, the rest must
    "student_t": [K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.MARDIA_KURT, K.KS_FRAC, K.MARDIA_KURT_P, K.HZ_P],
    "mixture": [K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.TOTAL_CORRELATION, K.PRIOR_HOLES,
                K.MARDIA_KURT_P, K.HZ_P],
    "low_rank": [K.GAUSS_KL, K.GAUSS_MMD, K.GAUSS_SWD, K.KNN_KL, K.TOTAL_CORRELATION, K.PRIOR_HOLES],
}


@pytest.mark.parametrize("kind", list(FLAGGED_BY))
def test_departures_are_flagged(kind, null_battery):
    r = G.gaussianity(codes(kind))
    assert all(math.isfinite(v) for v in r.values())
    for key in FLAGGED_BY[kind]:
        if key == K.KS_FRAC:
            assert r[key] <= 0.5, key
        elif key in (K.MARDIA_SKEW_P, K.MARDIA_KURT_P, K.HZ_P):
            assert r[key] < 1e-3, key
        else:
            assert r[key] > null_battery[key] + MARGIN[key], (key, r[key], null_battery[key])


@pytest.mark.parametrize("d", [8, 32])
def test_wide_codes_rank_worse_than_slightly_shifted_ones(d):
    """True KL: 3x wider is D/2 (9 - 1 - log 9) = 2.9 D nats, a 0.3 shift in every dimension 0.045 D nats."""
    wide, shifted, null = codes("wide", d=d, seed=1), codes("shifted", d=d, seed=2, shift=0.3), codes("null", d=d)
    for distance in (G.gauss_kl, G.gauss_mmd, G.gauss_swd, G.knn_kl):
        assert distance(wide) > 2 * distance(shifted) > 2 * distance(null), distance.__name__


# --- known answers ----------------------------------------------------------------------------------------

def kl_isotropic(d, m, s):
    """KL(N(m 1, s^2 I) || N(0, I))."""
    return d / 2 * (s**2 - 1 - math.log(s**2)) + d * m**2 / 2


def test_gauss_kl_equals_closed_form():
    d = 6
    mean, cov = torch.linspace(-1, 1, d, dtype=torch.float64), random_cov(d)
    expected = 0.5 * (cov.trace() + mean @ mean - d - torch.logdet(cov))
    assert G.gauss_kl(with_moments(mean, cov)) == pytest.approx(float(expected), rel=1e-5)


def test_singular_covariance_gives_finite_documented_kl():
    z = codes("null", d=8)
    z[:, 4:] = 0  # four collapsed dimensions, each adds 1/2 (jitter - 1 - log jitter)
    per_collapsed_dim = 0.5 * (1e-6 - 1 - math.log(1e-6))
    assert G.gauss_kl(z) == pytest.approx(G.gauss_kl(z[:, :4]) + 4 * per_collapsed_dim, rel=1e-4)
    assert math.isfinite(G.gauss_kl(torch.zeros(100, 8)))
    assert math.isfinite(G.gauss_kl(codes("low_rank")))
    assert math.isfinite(G.total_correlation(codes("low_rank")))


@pytest.mark.parametrize("m, s", [(0.5, 1.0), (0.0, 3.0), (0.0, 0.5)])
def test_knn_kl_recovers_isotropic_gaussian_kl(m, s):
    z = m + s * codes("null", d=8, seed=3)
    assert G.knn_kl(z) == pytest.approx(kl_isotropic(8, m, s), rel=0.1, abs=0.05)


@pytest.mark.parametrize("m, s", [(0.5, 1.0), (0.0, 3.0), (0.3, 0.5)])
def test_swd_and_mmd_match_population_values(m, s):
    """N(m 1, s^2 I): every unit projection is N(theta . m, s^2), so SW_2^2 = |m|^2 / D + (s - 1)^2;
    MMD^2 is a sum of Gaussian integrals (the docstring of gauss_mmd with the codes' law in place of N(0, I))."""
    d = 8
    z = m + s * codes("null", d=d, seed=4)
    assert G.gauss_swd(z) == pytest.approx(math.sqrt(m**2 + (s - 1) ** 2), abs=0.05)
    mmd2 = np.mean([(h2 / (h2 + 2 * s**2)) ** (d / 2)
                    - 2 * (h2 / (h2 + s**2 + 1)) ** (d / 2) * math.exp(-d * m**2 / (2 * (h2 + s**2 + 1)))
                    + (h2 / (h2 + 2)) ** (d / 2) for h2 in (d / 2, d, 2 * d)])
    assert G.gauss_mmd(z) == pytest.approx(mmd2, rel=0.1, abs=1e-3)


def test_total_correlation_equals_closed_form():
    cov = random_cov(5, seed=1)
    expected = 0.5 * (cov.diagonal().log().sum() - torch.logdet(cov))
    assert G.total_correlation(with_moments(torch.zeros(5), cov)) == pytest.approx(float(expected), rel=1e-4)


def test_active_units_counts_dimensions_above_threshold():
    variances = torch.tensor([0.0, 1e-4, 0.005, 0.02, 1.0, 9.0], dtype=torch.float64)
    e = with_moments(torch.zeros(6), torch.eye(6, dtype=torch.float64), n=500)  # unit sample variances
    mu = e * variances.sqrt() + 3.0  # an offset changes nothing
    assert G.active_units(mu) == 3
    assert G.active_units(mu, threshold=1e-5) == 5


def naive_mardia_hz(z: np.ndarray):
    """Mardia's b1, b2 and the HZ statistic, written as in the papers: explicit S^{-1}, double loops."""
    n, d = z.shape
    zc = z - z.mean(0)
    s_inv = np.linalg.inv(zc.T @ zc / n)
    g = zc @ s_inv @ zc.T  # (N, N) Mahalanobis inner products
    b1, b2 = (g**3).sum() / n**2, (np.diag(g) ** 2).mean()
    beta2 = ((2 * d + 1) * n / 4) ** (2 / (d + 4)) / 2
    hz = 0.0
    for i in range(n):
        for j in range(n):
            hz += math.exp(-beta2 / 2 * (zc[i] - zc[j]) @ s_inv @ (zc[i] - zc[j])) / n
        hz -= 2 * (1 + beta2) ** (-d / 2) * math.exp(-beta2 / (2 * (1 + beta2)) * g[i, i])
    return b1, b2, hz + n * (1 + 2 * beta2) ** (-d / 2)


def test_mardia_and_hz_match_the_papers_formulas(monkeypatch):
    z = codes("student_t", n=60, d=3, seed=5).numpy() @ np.array([[2.0, 0.5, 0], [0, 1, 0.3], [0, 0, 0.5]])
    b1, b2, hz = naive_mardia_hz(z)
    n, d = z.shape
    k = (d + 1) * (n + 1) * (n + 3) / (n * ((n + 1) * (d + 1) - 6))
    m = G.mardia(z)
    assert m.skew_stat == pytest.approx(n * k * b1 / 6, rel=1e-9)
    assert m.kurt_z == pytest.approx((b2 - d * (d + 2) * (n - 1) / (n + 1)) / math.sqrt(
        8 * d * (d + 2) * (n - 3) * (n - d - 1) * (n - d + 1) / ((n + 1) ** 2 * (n + 3) * (n + 5))), rel=1e-9)
    assert G.henze_zirkler(z)[0] == pytest.approx(hz, rel=1e-9)
    # against N(0, I): unstandardised, diagonal pairs excluded from the skewness
    gram = z @ z.T
    assert m.skew == pytest.approx(((gram**3).sum() - (np.diag(gram) ** 3).sum()) / (n * (n - 1)), rel=1e-9)
    assert m.kurt == pytest.approx(abs((np.diag(gram) ** 2).mean() - d * (d + 2)), rel=1e-9)
    # the pairwise sums give the same answer in blocks of a few rows
    monkeypatch.setattr(G, "_PAIR_BLOCK", 7 * n)
    assert G.henze_zirkler(z)[0] == pytest.approx(hz, rel=1e-9)
    assert G.mardia(z).skew_stat == pytest.approx(m.skew_stat, rel=1e-9)


def test_pairwise_blocks_do_not_change_mmd(monkeypatch):
    z = codes("mixture", n=300)
    full = G.gauss_mmd(z)
    monkeypatch.setattr(G, "_PAIR_BLOCK", 300 * 7)
    assert G.gauss_mmd(z) == pytest.approx(full, rel=1e-12)


def test_composite_tests_are_affine_invariant():
    z = codes("mixture", n=200, d=4)
    a = random_cov(4, seed=2)
    m, m_affine = G.mardia(z), G.mardia(z @ a + 5.0)
    assert m_affine.skew_p == pytest.approx(m.skew_p, rel=1e-6)
    assert m_affine.kurt_p == pytest.approx(m.kurt_p, rel=1e-6)
    assert G.henze_zirkler(z @ a + 5.0) == pytest.approx(G.henze_zirkler(z), rel=1e-6)


def test_p_values_are_calibrated_under_the_null():
    """Rejection rate at 5% over 200 seeded N(0, I) samples (N = 60, D = 3) within 3 binomial sd of 5%."""
    reps, alpha = 200, 0.05
    rejections = np.zeros(3)
    ks_rejected = []
    for seed in range(reps):
        z = codes("null", n=60, d=3, seed=100 + seed)
        m = G.mardia(z)
        rejections += [m.skew_p < alpha, m.kurt_p < alpha, G.henze_zirkler(z)[1] < alpha]
        ks_rejected.append(1 - G.ks_frac(z, alpha))
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert np.all(np.abs(rejections / reps - alpha) < tolerance), rejections / reps
    ks_tolerance = 3 * math.sqrt(alpha * (1 - alpha) / (3 * reps))  # three marginals per sample
    assert abs(np.mean(ks_rejected) - alpha) < ks_tolerance


TESTS = (K.MARDIA_SKEW_P, K.MARDIA_KURT_P, K.HZ_STAT, K.HZ_P)  # composite normality tests: nan without a test


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constant_codes_have_no_normality_test(dtype):
    """Codes all equal to 0.3: centring leaves a ~1e-17 rounding residue that a rank cut relative to the
    largest eigenvalue takes for a rank-1 signal; judged on the absolute scale there is no variance at all."""
    z = torch.full((300, 8), 0.3, dtype=dtype)
    assert G.constant_dims(z).all()
    m = G.mardia(z)
    assert all(math.isnan(v) for v in (m.skew_stat, m.skew_p, m.kurt_z, m.kurt_p, *G.henze_zirkler(z)))
    r = G.gaussianity(z)
    assert all(math.isnan(r[key]) for key in TESTS)
    # the distances to N(0, I) stay finite and far from it: each collapsed dimension costs KL ~ 6.4 nats
    assert all(math.isfinite(v) for k, v in r.items() if k not in TESTS)
    assert r[K.GAUSS_KL] > 8 * 6
    assert r[K.MARDIA_KURT] == pytest.approx(abs((8 * 0.09) ** 2 - 8 * 10), rel=1e-6)  # |(|z|^2)^2 - D(D+2)|


def test_a_constant_dimension_is_left_out_of_the_tests_and_flagged_by_the_distances():
    """One dimension fixed at 0.3 among 7 N(0, 1) ones: a degenerate Gaussian is still Gaussian (the composite
    null allows any covariance, singular included), so the tests run in the 7-dimensional span and give
    exactly the values of the 7 other dimensions alone (r = D - 1), not a rejection and not nan; the
    distances to N(0, I) see the collapsed dimension."""
    z = codes("null", n=300, d=8)
    z[:, 3] = 0.3
    others = z[:, [0, 1, 2, 4, 5, 6, 7]]
    assert G.constant_dims(z).tolist() == [False] * 3 + [True] + [False] * 4
    assert G._whiten(z)[1] == 7
    m, m7 = G.mardia(z), G.mardia(others)
    for name in ("skew_stat", "skew_p", "kurt_z", "kurt_p"):
        assert getattr(m, name) == pytest.approx(getattr(m7, name), rel=1e-9), name
    assert G.henze_zirkler(z) == pytest.approx(G.henze_zirkler(others), rel=1e-9)
    assert min(m.skew_p, m.kurt_p, G.henze_zirkler(z)[1]) > 1e-3
    assert G.gauss_kl(z) > G.gauss_kl(others) + 6


@pytest.mark.parametrize("n, d", [(300, 8), (20, 5)])
def test_null_values_are_the_plug_in_estimates_expectation_on_standard_normal_codes(n, d):
    """Closed forms (Wishart log-determinant) against a seeded Monte Carlo of the estimators themselves."""
    reps = 400
    g = torch.Generator().manual_seed(7)
    samples = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(reps)]
    for estimate, null in ((G.gauss_kl, G.gauss_kl_null), (G.total_correlation, G.total_correlation_null)):
        values = np.array([estimate(z) for z in samples])
        se = values.std(ddof=1) / math.sqrt(reps)
        assert abs(values.mean() - null(n, d)) < 4 * se, (estimate.__name__, values.mean(), null(n, d), se)
    # the large-n expansions: d / (2n) + d (d + 1) / (4n) and d (d - 1) / (4n)
    assert G.gauss_kl_null(10**6, 8) == pytest.approx(8 / 2e6 + 72 / 4e6, rel=1e-3)
    assert G.total_correlation_null(10**6, 8) == pytest.approx(56 / 4e6, rel=1e-3)
    assert math.isnan(G.gauss_kl_null(8, 8)) and math.isnan(G.total_correlation_null(5, 8))


def test_the_battery_records_the_number_of_codes_it_used():
    z = codes("null", n=400, d=4)
    r = G.gaussianity(z)
    assert (r[keys.CODES_N], r[keys.PRIOR_HOLES_FIT_N]) == (400, 200)
    assert r[keys.GAUSS_KL_NULL] == G.gauss_kl_null(400, 4)
    # the Metric: a bounded subset, and repeated (padding) indices counted once
    capped = feed(G.LatentGaussianity(max_codes=150), z).compute()
    assert (capped[keys.CODES_N], capped[keys.PRIOR_HOLES_FIT_N]) == (150, 75)
    assert capped[keys.GAUSS_KL_NULL] == G.gauss_kl_null(150, 4)
    padded = torch.cat([z[:99], z[:1]])
    index = torch.cat([torch.arange(99), torch.zeros(1, dtype=torch.long)])
    assert feed(G.LatentGaussianity(), padded, index=index).compute()[keys.CODES_N] == 99


# --- the Metric -------------------------------------------------------------------------------------------

def feed(metric, z, mu=None, batch_size=None, order=None, index=None):
    order = torch.arange(len(z)) if order is None else order
    index = torch.arange(len(z)) if index is None else index
    for rows in torch.split(order, batch_size or len(z)):
        metric.update(z[rows], None if mu is None else mu[rows], index=index[rows])
    return metric


def test_metric_equals_pure_function_and_ignores_batching(null_battery):
    z, mu = codes("null"), codes("null")
    metric = G.LatentGaussianity()
    for rows in torch.split(torch.arange(N), 1000):  # default indices: the running count
        metric.update(z[rows], mu[rows])
    assert metric.compute() == null_battery
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    one_by_one = feed(G.LatentGaussianity(), z, mu, batch_size=1, order=order)
    assert one_by_one.compute() == null_battery


def test_metric_buffer_is_bounded_and_subset_is_order_independent():
    z, max_codes = codes("mixture"), 300
    metric = G.LatentGaussianity(max_codes=max_codes, seed=3)
    for rows in torch.split(torch.randperm(N, generator=torch.Generator().manual_seed(0)), 64):
        metric.update(z[rows], index=rows)
        assert sum(len(t) for t in metric.z) <= 2 * max_codes + 64
    expected = G.gaussianity(z[G._bottom_k(torch.arange(N), max_codes, seed=3)], seed=3)
    assert metric.compute() == expected
    assert feed(G.LatentGaussianity(max_codes=max_codes, seed=3), z, batch_size=1).compute() == expected
    kept = G._bottom_k(torch.arange(N), max_codes, seed=3)
    assert len(kept) == max_codes and kept.unique().numel() == max_codes
    assert len(set(kept.tolist()) & set(G._bottom_k(torch.arange(N), max_codes, seed=4).tolist())) < max_codes


def simulated_ddp_compute(metrics, rank):
    """compute() on ``metrics[rank]`` with torchmetrics' sync path, the all-gather served from the other
    metrics' states (one gather per state, in declaration order, as _sync_dist issues them)."""
    gathered = iter([[dim_zero_cat(getattr(m, name)) if len(getattr(m, name)) else torch.tensor([])
                      for m in metrics] for name in ("z", "mu", "index")])
    metric = metrics[rank]
    metric.dist_sync_fn = lambda tensor, group=None: next(gathered)
    metric.distributed_available_fn = lambda: True
    return metric.compute()


def test_two_process_run_equals_one_process_run():
    """DistributedSampler-style shards (rank r gets indices r::2; index 0 is repeated to pad), max_codes
    smaller than the data so that each rank compacts its own buffer."""
    n, max_codes = 1999, 400
    z, mu = codes("student_t", n=n), codes("null", n=n)
    single = feed(G.LatentGaussianity(max_codes=max_codes), z, mu, batch_size=50).compute()
    shards = [torch.arange(0, n, 2), torch.cat([torch.arange(1, n, 2), torch.tensor([0])])]
    ranks = [G.LatentGaussianity(max_codes=max_codes) for _ in shards]
    for metric, shard in zip(ranks, shards):
        for rows in torch.split(shard, 25):
            metric.update(z[rows], mu[rows], index=rows)
    assert simulated_ddp_compute(ranks, 0) == single
    assert simulated_ddp_compute(ranks[::-1], 0) == single  # the order in which ranks arrive does not matter


def test_metric_rejects_mixed_mu_and_forward():
    metric = G.LatentGaussianity()
    metric.update(codes("null", n=10), codes("null", n=10))
    with pytest.raises(ValueError):
        metric.update(codes("null", n=10))
    with pytest.raises(NotImplementedError):
        metric(codes("null", n=10))


def test_a_gmm_whose_em_fails_is_refit_with_a_larger_covariance_floor_that_it_reports(monkeypatch):
    """Where EM fails at sklearn's 1e-6 covariance floor, the fit is redone at 1e-3, and the fit reports the floor
    it used (the record's protocol names it). Whether real collapsed codes make sklearn's Cholesky fail at 1e-6
    depends on the last bits of the machine's BLAS, so the failure is sklearn's own error, raised at that floor."""
    from sklearn.mixture import GaussianMixture

    from benchmark.metrics import gaussianity

    class FailsBelowTheFloor(GaussianMixture):
        def fit(self, X, y=None):
            if self.reg_covar < 1e-3:
                raise ValueError("Fitting the mixture model failed because some components have ill-defined "
                                 "empirical covariance (for instance caused by singleton or collapsed samples).")
            return super().fit(X, y)

    z = np.random.default_rng(0).normal(size=(500, 2))
    assert gaussianity.fit_gmm(z, 3, 0).reg_covar == 1e-6
    monkeypatch.setattr(gaussianity, "GaussianMixture", FailsBelowTheFloor)
    refit = gaussianity.fit_gmm(z, 3, 0)
    assert refit.reg_covar == 1e-3 and refit.converged_ and refit.means_.shape == (3, 2)
