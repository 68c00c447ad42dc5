"""How far is the aggregate posterior q(z) from the prior N(0, I)? A battery on a set of codes z (N, D).

Pure functions hold the maths (torch or numpy in, python floats out, computed in float64 on the CPU);
``LatentGaussianity`` is the torchmetrics shell that gathers a bounded, order-independent subset of codes.

Three kinds of number are reported:
- distances to N(0, I) itself (lower is better): gauss_kl, gauss_mmd, gauss_swd, mardia_skew, mardia_kurt,
  prior_holes, knn_kl; and ks_frac, the fraction of marginals that pass a test against N(0, 1);
- classical composite normality tests (is q Gaussian with *some* mean and covariance?): hz_stat and the
  p-values mardia_skew_p, mardia_kurt_p, hz_p (reported, not ranked);
- structure: total_correlation (dependence between dimensions) and active_units (Burda et al. 2016);
- the sample size: codes_n, prior_holes_fit_n, and gauss_kl_null, total_correlation_null, the values the
  plug-in estimates gauss_kl and total_correlation take in expectation on exact N(0, I) codes of that size
  (their bias upwards at finite N; reported, not ranked).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import special, stats
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from benchmark.metrics import keys
from benchmark.regularizers import batch_moments, gaussian_kl_to_standard, sliced_wasserstein

# Entries of one block of an N x N pairwise matrix: 2 MiB in float64, so a block's chain of elementwise ops
# stays in cache. 10k codes: the battery took 6.4-8.5 s with 32 MiB blocks, 3.4-3.6 s with these, 4.3 s with
# 512 KiB blocks (more, shorter Python-level steps); the values agree to 1e-12.
_PAIR_BLOCK = 2**18


def _as_float64(z) -> Tensor:
    z = torch.as_tensor(z).detach().to("cpu", torch.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"expected codes of shape (N >= 2, D), got {tuple(z.shape)}")
    return z


def _row_blocks(n: int, m: int):
    """Row slices of an (n, m) pairwise matrix, each block at most ~_PAIR_BLOCK entries, to bound memory."""
    step = max(1, _PAIR_BLOCK // max(m, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2 (n, m), clamped at 0 against cancellation."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def constant_dims(z) -> Tensor:
    """Dimensions (D,) bool whose codes are all equal to float64 rounding, judged on each dimension's own
    absolute scale: sd_u <= 1e-10 max_i |z_iu|. Centring N equal values leaves a residue of at most about
    N eps |z_u| (2e-12 |z_u| at N = 1e4), far below the 1e-10 cut, while a dimension that varies in float32
    varies by at least 6e-8 of its magnitude. Not a rank cut relative to the other dimensions: codes that are
    constant everywhere have no scale to be relative to, and their rounding residue would pass as a rank-1
    signal (codes of value 0.3 got Henze-Zirkler p ~ 1e-24 that way)."""
    z = _as_float64(z)
    return (z - z.mean(0)).pow(2).mean(0).sqrt() <= 1e-10 * z.abs().amax(0)


def _whiten(z: Tensor) -> tuple[Tensor, int]:
    """y = (z - mean) S^{-1/2} with S the maximum-likelihood covariance (1/N), restricted to the span of S.

    Returns y (N, r) and the rank r: rank-deficient codes are tested in their r-dimensional span (the
    pseudo-inverse), so the reference distributions of the tests use r in place of D. Constant dimensions
    (``constant_dims``) are dropped first, so constant codes have r = 0, and a constant dimension among
    others gives exactly the test of the others.
    """
    zc = z - z.mean(0)
    zc = zc[:, ~constant_dims(z)]  # (N, D') with D' <= D
    if zc.shape[1] == 0:
        return zc, 0
    eigval, eigvec = torch.linalg.eigh(zc.T @ zc / z.shape[0])
    keep = eigval > eigval.max().clamp_min(1e-300) * 1e-10
    return zc @ eigvec[:, keep] / eigval[keep].sqrt(), int(keep.sum())


def gauss_kl(z, jitter: float = 1e-6) -> float:
    """KL(N(m, C) || N(0, I)) = 1/2 (tr C + |m|^2 - D - log det C) of the Gaussian fitted to the codes.

    Uses ``gaussian_kl_to_standard``: a singular covariance (collapsed or low-rank codes) gets ``jitter`` * I,
    so each collapsed dimension (zero variance, zero mean) adds 1/2 (jitter - 1 - log jitter) ~= 6.4 nats:
    finite, large, never NaN.
    """
    mean, cov = batch_moments(_as_float64(z))
    return float(gaussian_kl_to_standard(mean, cov, jitter))


def _expected_log_det_sample_cov(n: int, d: int) -> float:
    """E log det S for S the (n - 1)-normalised sample covariance of n draws from N(0, I_d):
    (n - 1) S ~ Wishart_d(n - 1, I), so E log det((n - 1) S) = sum_{i=1}^{d} psi((n - i) / 2) + d log 2
    (e.g. Anderson 2003, Theorem 7.5.3 for the product of independent chi-squares)."""
    i = np.arange(1, d + 1)
    return float(special.digamma((n - i) / 2).sum() + d * math.log(2) - d * math.log(n - 1))


def gauss_kl_null(n: int, d: int) -> float:
    """E[gauss_kl] over n exact N(0, I_d) samples: what the plug-in estimate reports for the prior itself.

    With E tr S = d and E |m|^2 = d / n, E KL = 1/2 (d / n - E log det S) (``_expected_log_det_sample_cov``);
    about d / (2n) + d (d + 1) / (4n) for n >> d. nan for n <= d, where S is singular (the estimate then
    rests on the jitter). The jitter's own share, about d * jitter, is left out.
    """
    if n <= d:
        return math.nan
    return 0.5 * (d / n - _expected_log_det_sample_cov(n, d))


def gauss_mmd(z, bandwidths2: tuple[float, ...] | None = None) -> float:
    """MMD^2(q, N(0, I)) with k(x, y) = exp(-|x - y|^2 / (2 h^2)), averaged over bandwidths h^2.

    The prior's expectations are closed form (Gaussian integrals): E_{y~N(0,I)} k(z, y) =
    (h^2 / (h^2 + 1))^{D/2} exp(-|z|^2 / (2 (h^2 + 1))) and E_{y,y'} k = (h^2 / (h^2 + 2))^{D/2}; the codes'
    term is the unbiased U-statistic (i != j) (Gretton et al. 2012, Eq. 3). Default h^2 in {D/2, D, 2D}:
    squared distances between codes grow like 2D, and a fixed unit bandwidth saturates in high D (every pair
    looks far): in 32 dims it scores codes 3x wider than the prior 2.3e-8, below codes shifted by 0.5 in
    every dimension (3.6e-8). With h^2 proportional to D the ranking follows the KL (0.31 vs 0.028 for a 0.3
    shift, in 8 and in 32 dims).
    """
    z = _as_float64(z)
    n, d = z.shape
    h2s = torch.tensor(bandwidths2 or (d / 2, d, 2 * d), dtype=torch.float64)  # (H,)
    within = torch.zeros_like(h2s)
    for rows in _row_blocks(n, n):
        sq = _sq_dists(z[rows], z)  # (B, N)
        within += torch.stack([torch.exp(sq * (-0.5 / h2)).sum() for h2 in h2s.tolist()])
    within = (within - n) / (n * (n - 1))  # the diagonal k(z_i, z_i) = 1 is excluded
    sq_norm = z.pow(2).sum(1, keepdim=True)  # (N, 1)
    cross = ((h2s / (h2s + 1)) ** (d / 2) * torch.exp(-sq_norm / (2 * (h2s + 1)))).mean(0)
    prior = (h2s / (h2s + 2)) ** (d / 2)
    return float((within - 2 * cross + prior).mean())


def gauss_swd(z, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance SW_2 = (E_theta W_2^2(theta^T q, N(0, 1)))^{1/2} (Kolouri et al. 2019).

    Every projection of N(0, I) on a unit direction is N(0, 1), so the target's sorted projections are the
    exact normal quantiles Phi^{-1}((i - 1/2) / N); the directions are uniform on the sphere with a fixed seed.
    """
    return float(sliced_wasserstein(_as_float64(z), n_projections, 2, torch.Generator().manual_seed(seed)).sqrt())


def _third_moment_pairs(y: Tensor, unbiased: bool) -> float:
    """mean over pairs of (y_i . y_j)^3: all N^2 pairs, or only i != j (unbiased for |E y (x) y (x) y|^2)."""
    n = y.shape[0]
    total = sum(float((y[rows] @ y.T).pow(3).sum()) for rows in _row_blocks(n, n))
    if not unbiased:
        return total / n**2
    return (total - float(y.pow(2).sum(1).pow(3).sum())) / (n * (n - 1))


class Mardia(NamedTuple):
    skew: float  # |E z(x)z(x)z|^2 about 0, U-statistic; 0 under N(0, I)
    kurt: float  # |mean |z|^4 - D (D + 2)|; 0 in expectation under N(0, I)
    skew_stat: float  # composite test: N b1,D / 6 (small-sample corrected), ~ chi2 with r(r+1)(r+2)/6 dof
    skew_p: float
    kurt_z: float  # composite test: (b2,D - E b2) / sd b2, ~ N(0, 1)
    kurt_p: float  # two-sided


def mardia(z) -> Mardia:
    """Mardia's (1970) multivariate skewness b1 = 1/N^2 sum_ij (z_i^T z_j)^3 and kurtosis b2 = 1/N sum_i |z_i|^4.

    Against N(0, I) (z unstandardised): ``skew`` excludes i = j, whose |z_i|^6 terms would add a bias
    D(D+2)(D+4)/N, and ``kurt`` = |b2 - D(D+2)|. Composite test (z whitened by its sample mean and ML
    covariance, rank r): skewness with Mardia's (1974) small-sample factor k = (r+1)(N+1)(N+3) /
    (N((N+1)(r+1) - 6)), kurtosis standardised by its exact null mean r(r+2)(N-1)/(N+1) and variance
    8r(r+2)(N-3)(N-r-1)(N-r+1) / ((N+1)^2 (N+3)(N+5)) (Mardia 1974). The test entries are nan for
    constant codes (r = 0, see ``constant_dims``) or N <= r + 1; ``skew`` and ``kurt``, distances to N(0, I),
    stay finite (constant codes are far from it).
    """
    z = _as_float64(z)
    d = z.shape[1]
    skew = _third_moment_pairs(z, unbiased=True)
    kurt = abs(float(z.pow(2).sum(1).pow(2).mean()) - d * (d + 2))

    y, r = _whiten(z)
    n = y.shape[0]
    if r == 0 or n <= r + 1:  # constant codes, or too few to estimate a covariance: no test
        return Mardia(skew, kurt, math.nan, math.nan, math.nan, math.nan)
    b1 = _third_moment_pairs(y, unbiased=False)
    b2 = float(y.pow(2).sum(1).pow(2).mean())
    k = (r + 1) * (n + 1) * (n + 3) / (n * ((n + 1) * (r + 1) - 6))
    skew_stat = n * k * b1 / 6
    skew_p = float(stats.chi2.sf(skew_stat, r * (r + 1) * (r + 2) / 6))
    mean_b2 = r * (r + 2) * (n - 1) / (n + 1)
    var_b2 = 8 * r * (r + 2) * (n - 3) * (n - r - 1) * (n - r + 1) / ((n + 1) ** 2 * (n + 3) * (n + 5))
    kurt_z = (b2 - mean_b2) / math.sqrt(var_b2)
    kurt_p = float(2 * stats.norm.sf(abs(kurt_z)))
    return Mardia(skew, kurt, skew_stat, skew_p, kurt_z, kurt_p)


def henze_zirkler(z) -> tuple[float, float]:
    """Henze-Zirkler (1990) statistic and p-value, z whitened by its sample mean and ML covariance (rank r).

    HZ = 1/N sum_ij exp(-b^2/2 D_ij) - 2 (1+b^2)^{-r/2} sum_i exp(-b^2/(2(1+b^2)) D_i) + N (1+2b^2)^{-r/2},
    D_ij = |y_i - y_j|^2, D_i = |y_i|^2, b = ((2r+1) N / 4)^{1/(r+4)} / sqrt(2). The p-value uses the
    lognormal law with HZ's exact null mean and variance (Henze & Zirkler 1990, Theorem 2.1).
    Constant codes (r = 0, see ``constant_dims``) have no test: (nan, nan).
    """
    y, r = _whiten(_as_float64(z))
    n = y.shape[0]
    if r == 0:  # constant codes: no test
        return math.nan, math.nan
    b2 = ((2 * r + 1) * n / 4) ** (2 / (r + 4)) / 2  # beta^2
    pairs = sum(float(torch.exp(-b2 / 2 * _sq_dists(y[rows], y)).sum()) for rows in _row_blocks(n, n))
    to_centre = float(torch.exp(-b2 / (2 * (1 + b2)) * y.pow(2).sum(1)).sum())
    hz = pairs / n - 2 * (1 + b2) ** (-r / 2) * to_centre + n * (1 + 2 * b2) ** (-r / 2)

    a, w = 1 + 2 * b2, (1 + b2) * (1 + 3 * b2)
    mean = 1 - a ** (-r / 2) * (1 + r * b2 / a + r * (r + 2) * b2**2 / (2 * a**2))
    var = (
        2 * (1 + 4 * b2) ** (-r / 2)
        + 2 * a ** (-r) * (1 + 2 * r * b2**2 / a**2 + 3 * r * (r + 2) * b2**4 / (4 * a**4))
        - 4 * w ** (-r / 2) * (1 + 3 * r * b2**2 / (2 * w) + r * (r + 2) * b2**4 / (2 * w**2))
    )
    log_scale = math.log(mean**2 / math.sqrt(var + mean**2))  # the lognormal with this mean and variance
    sigma = math.sqrt(math.log1p(var / mean**2))
    return hz, float(stats.lognorm.sf(hz, sigma, scale=math.exp(log_scale)))


def ks_frac(z, alpha: float = 0.05) -> float:
    """Fraction of dimensions whose marginal passes the Kolmogorov-Smirnov test against N(0, 1) at ``alpha``
    (1 - alpha in expectation under N(0, I); no multiple-testing correction, by design: it is a fraction)."""
    z = _as_float64(z).numpy()
    return float(np.mean([stats.kstest(z[:, j], "norm").pvalue > alpha for j in range(z.shape[1])]))


def prior_holes(z_fit, z_eval, n_prior: int = 10_000, seed: int = 0, n_components: int = 10) -> float:
    """Fraction of prior samples that land where the codes have (almost) no mass.

    A full-covariance Gaussian mixture q_hat is fit to ``z_fit``; the threshold is the 1st percentile of
    log q_hat on the held-out ``z_eval``; the result is P_{N(0,I)}(log q_hat(z) < threshold), about 0.01 when
    the codes are N(0, I) (held-out codes and prior samples are then exchangeable). Components are capped at
    len(z_fit); if EM fails (e.g. collapsed codes), it is refit once with reg_covar=1e-3.
    """
    z_fit, z_eval = _as_float64(z_fit).numpy(), _as_float64(z_eval).numpy()
    n_components = min(n_components, len(z_fit))
    z_prior = np.random.default_rng(seed).standard_normal((n_prior, z_fit.shape[1]))
    gmm = fit_gmm(z_fit, n_components, seed)
    with threadpool_limits(1, user_api="blas"):
        threshold = np.quantile(gmm.score_samples(z_eval), 0.01)
        return float(np.mean(gmm.score_samples(z_prior) < threshold))


def fit_gmm(codes: np.ndarray, n_components: int, seed: int) -> GaussianMixture:
    """A full-covariance Gaussian mixture on codes (N, D), in float64 (float32 gives spuriously non-PSD
    covariances): the prior-holes test's density, and the RAE protocol's ex-post density on the training
    codes (Ghosh et al. 2020, Section 4). Where EM fails (collapsed codes) it is refit once with
    reg_covar=1e-3."""
    codes = np.asarray(codes, dtype=np.float64)
    # One BLAS thread: EM's products are (N, D) x (D, D) with D ~ 16, too small to share, and a pool beside
    # torch's only contends (50k codes: 7.8 s -> 5.0 s on 2 cores; the holes test's fits ~20x faster).
    with threadpool_limits(1, user_api="blas"):
        try:
            return GaussianMixture(n_components, covariance_type="full", random_state=seed).fit(codes)
        except ValueError:
            return GaussianMixture(n_components, covariance_type="full", reg_covar=1e-3,
                                   random_state=seed).fit(codes)


def _kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (column 0 of kneighbors is the row itself)."""
    with threadpool_limits(1, user_api="blas"):
        return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]


def knn_kl(z, k: int = 5, seed: int = 0) -> float:
    """k-NN estimate of KL(q || N(0, I)) = E_q log q - E_q log N(z; 0, I), calibrated on a prior sample.

    The cross-entropy is closed form, 1/2 (D log 2 pi + E_q |z|^2); the entropy uses the Kozachenko-Leonenko
    estimator H = psi(n) - psi(k) + log V_D + D/n sum_i log rho_k(i), rho_k(i) the distance from z_i to its
    k-th nearest other code. The same estimate on a seeded N(0, I) sample y of the same size (true KL 0) is
    subtracted, which cancels psi, V_D and the estimator's bias (invariant under shifts and scalings):
        KL = 1/2 (mean |z|^2 - mean |y|^2) + D/n sum_j log rho^y_k(j) - D/n sum_i log rho^z_k(i).
    Why not the two-sample estimator of Wang, Kulkarni & Verdu (2009), D/n sum log(nu_k / rho_k) +
    log(m / (n - 1))? At N = 2000 in 32 dims its neighbourhoods are too wide: codes 3x wider than the prior
    score -3.6 (true KL 92.8), below codes shifted by 0.3 (0.88). Duplicate codes (rho = 0) are floored at
    1e-12 so the value stays finite.
    """
    z = _as_float64(z).numpy()
    n, d = z.shape
    y = np.random.default_rng(seed).standard_normal((n, d))
    cross_entropy_gap = 0.5 * (np.mean((z**2).sum(1)) - np.mean((y**2).sum(1)))
    log_rho_z = np.log(np.maximum(_kth_neighbour_distance(z, k), 1e-12))
    log_rho_y = np.log(_kth_neighbour_distance(y, k))
    return float(cross_entropy_gap + d * (log_rho_y.mean() - log_rho_z.mean()))


def active_units(mu, threshold: float = 0.01) -> float:
    """Number of dimensions u with Var_x(E_q(z|x)[z_u]) > threshold (Burda et al. 2016, Section 5.2);
    ``mu`` (N, D) holds the posterior means (for a deterministic encoder, the codes)."""
    return float((_as_float64(mu).var(0) > threshold).sum())


def total_correlation(z, jitter: float = 1e-6) -> float:
    """Gaussian total correlation KL(N(m, C) || prod_u N(m_u, C_uu)) = 1/2 (sum_u log C_uu - log det C).

    ``jitter`` * I keeps it finite: a collapsed independent dimension adds 0, a collapsed direction that
    mixes dimensions (low-rank codes) adds about 1/2 log(C_uu / jitter).
    """
    _, cov = batch_moments(_as_float64(z))
    cov = cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype)
    return float(0.5 * (cov.diagonal().log().sum() - torch.linalg.slogdet(cov).logabsdet))


def total_correlation_null(n: int, d: int) -> float:
    """E[total_correlation] over n draws with independent Gaussian dimensions (any means and variances: the
    estimate is invariant to them): 1/2 (d E log S_uu - E log det S), with (n - 1) S_uu ~ chi2_{n-1}, so
    1/2 (d psi((n - 1) / 2) - sum_{i=1}^{d} psi((n - i) / 2)); about d (d - 1) / (4n) for n >> d. nan for
    n <= d."""
    if n <= d:
        return math.nan
    i = np.arange(1, d + 1)
    return float(0.5 * (d * special.digamma((n - 1) / 2) - special.digamma((n - i) / 2).sum()))


def gaussianity(z, mu=None, seed: int = 0) -> dict[str, float]:
    """The whole battery, keyed by ``benchmark.metrics.keys``. ``prior_holes`` fits on a seeded random half of
    the codes and thresholds on the other half; ``active_units`` is omitted unless the posterior means ``mu``
    are given (for sampled codes, Var(z) includes the posterior noise and counts nothing).

    Estimates that depend on the sample size come with it: ``codes_n`` (N: every estimate but prior_holes,
    knn_kl included, uses all N codes), ``prior_holes_fit_n`` (N // 2, the codes the mixture is fitted on;
    it is thresholded on the other N - N // 2), and the plug-in estimates' values for exact N(0, I) codes
    of the same N and D, ``gauss_kl_null`` and ``total_correlation_null``: the estimate's floor, which a
    value near it cannot be told from."""
    z = _as_float64(z)
    n, d = z.shape
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    m = mardia(z)
    hz, hz_p = henze_zirkler(z)
    out = {
        keys.GAUSS_KL: gauss_kl(z),
        keys.GAUSS_KL_NULL: gauss_kl_null(n, d),
        keys.GAUSS_MMD: gauss_mmd(z),
        keys.GAUSS_SWD: gauss_swd(z, seed=seed),
        keys.MARDIA_SKEW: m.skew,
        keys.MARDIA_KURT: m.kurt,
        keys.MARDIA_SKEW_P: m.skew_p,
        keys.MARDIA_KURT_P: m.kurt_p,
        keys.HZ_STAT: hz,
        keys.HZ_P: hz_p,
        keys.KS_FRAC: ks_frac(z),
        keys.PRIOR_HOLES: prior_holes(z[perm[: n // 2]], z[perm[n // 2 :]], seed=seed),
        keys.KNN_KL: knn_kl(z, seed=seed),
        keys.TOTAL_CORRELATION: total_correlation(z),
        keys.TOTAL_CORRELATION_NULL: total_correlation_null(n, d),
        keys.CODES_N: float(n),
        keys.PRIOR_HOLES_FIT_N: float(n // 2),
    }
    if mu is not None:
        out[keys.ACTIVE_UNITS] = active_units(mu)
    return out


def _priority(index: Tensor, seed: int) -> np.ndarray:
    """A seeded pseudo-random key per dataset index (the splitmix64 finaliser, a bijection of uint64), so
    "the k smallest keys" is a uniform random subset that does not depend on arrival order or rank."""
    offset = np.uint64((seed + 1) * 0x9E3779B97F4A7C15 % 2**64)
    x = index.detach().cpu().numpy().astype(np.uint64) + offset  # uint64 arrays wrap modulo 2^64, as intended
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _bottom_k(index: Tensor, k: int, seed: int) -> Tensor:
    """Positions of the k codes with the smallest priority, one per dataset index, returned in index order."""
    index = index.detach().cpu().long()
    _, first = np.unique(index.numpy(), return_index=True)  # drop repeats (DistributedSampler padding)
    first = torch.from_numpy(first)
    chosen = first[torch.from_numpy(np.argsort(_priority(index[first], seed), kind="stable")[:k])]
    return chosen[index[chosen].argsort()]


class LatentGaussianity(Metric):
    """The Gaussianity battery of the aggregate posterior, over a bounded, seeded subset of the codes.

    ``update(z, mu=None, index=None)`` takes codes z (B, D), optionally the posterior means mu (B, D), and
    the dataset index (B,) of each code (default: a per-process running count, enough on one process; pass
    the dataset index under DDP). Subsampling rule: each dataset index gets a seeded pseudo-random key; the
    metric keeps the ``max_codes`` codes with the smallest keys (one per index: repeats, such as
    DistributedSampler padding, are dropped). Each process compacts its buffer to its own ``max_codes``
    smallest keys whenever it exceeds 2 * ``max_codes`` codes, so memory stays below 2 * max_codes + one batch,
    and the global smallest keys always survive; ``compute`` gathers, keeps the global ``max_codes`` smallest,
    sorts them by index and runs ``gaussianity``. The result is therefore independent of batching, arrival
    order and the number of processes. ``forward`` is not supported: the battery needs the whole set.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, max_codes: int = 10_000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.max_codes, self.seed = max_codes, seed
        self.add_state("z", default=[], dist_reduce_fx="cat")
        self.add_state("mu", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self._n_seen = 0  # source of default indices

    def update(self, z: Tensor, mu: Tensor | None = None, index: Tensor | None = None) -> None:
        z = z.detach()
        if (mu is None) != (len(self.mu) == 0) and len(self.index) > 0:
            raise ValueError("pass mu to every update() or to none")
        if index is None:
            index = torch.arange(self._n_seen, self._n_seen + len(z), device=z.device)
        self._n_seen += len(z)
        self.z.append(z)
        self.index.append(index.detach().long())
        if mu is not None:
            self.mu.append(mu.detach())
        if sum(len(i) for i in self.index) > 2 * self.max_codes:
            self._compact()

    def _compact(self) -> None:
        z, index = dim_zero_cat(self.z), dim_zero_cat(self.index)
        keep = _bottom_k(index, self.max_codes, self.seed).to(z.device)
        self.z[:], self.index[:] = [z[keep]], [index[keep]]
        if self.mu:
            self.mu[:] = [dim_zero_cat(self.mu)[keep]]

    def compute(self) -> dict[str, float]:
        z, index = dim_zero_cat(self.z), dim_zero_cat(self.index).long()
        mu = dim_zero_cat(self.mu) if len(self.mu) else None
        if mu is not None and mu.numel() == 0:
            mu = None
        if mu is not None and len(mu) != len(z):
            raise ValueError("pass mu to every update() or to none")
        keep = _bottom_k(index, self.max_codes, self.seed).to(z.device)
        return gaussianity(z[keep], None if mu is None else mu[keep], seed=self.seed)

    def reset(self) -> None:
        super().reset()
        self._n_seen = 0

    def forward(self, *args, **kwargs):
        raise NotImplementedError("LatentGaussianity: call update() per batch and compute() once")
