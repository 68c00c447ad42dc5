"""Metric keys shared by evaluation, run records, the leaderboard and the tests.

Each key maps to the direction in which the metric improves, so that ranking never guesses.
"""

# Likelihood (nats per image unless the key says otherwise).
ELBO = "elbo"
DISTORTION = "distortion"          # -E_q[log p(x|z)]
RATE = "rate"                      # KL(q(z|x) || p(z))
ELBO_EXPOST = "elbo_expost"        # old records only: the ex-post Gaussian of deterministic encoders
NLL_IW = "nll_iw"                  # -log p(x) by importance sampling (IWAE bound L_K), the largest K

# The encoder's own posterior gives ELBO, DISTORTION, RATE (stochastic encoders only); the post-hoc
# posterior fitted alike for every decoder (``benchmark.evaluation.PosthocPosterior``) gives these, and is
# the proposal of NLL_IW.
POSTHOC = "_posthoc"
ELBO_POSTHOC = ELBO + POSTHOC
DISTORTION_POSTHOC = DISTORTION + POSTHOC
RATE_POSTHOC = RATE + POSTHOC


def nll_iw_k(k: int) -> str:
    """The key of -L_K at one K of the ladder, e.g. ``nll_iw_k100``."""
    return f"{NLL_IW}_k{k}"


IW_LADDER = (1, 10, 100, 1000)  # the default ladder of K

# Bits per dimension of the discrete data, -log2 P(x_discrete) / D (or its bound), of a likelihood key:
# ``<key>_bpd``. Only for a probability of the discrete data: a discrete likelihood, or a density on
# dequantised data (+ log2 levels); a density on the raw grid values gets none.
BPD_SUFFIX = "_bpd"
BPD_SOURCES = (ELBO, ELBO_EXPOST, ELBO_POSTHOC, NLL_IW)  # the ones that are -log p (not log p): NLL_IW
ELBO_BPD = ELBO + BPD_SUFFIX
ELBO_EXPOST_BPD = ELBO_EXPOST + BPD_SUFFIX
ELBO_POSTHOC_BPD = ELBO_POSTHOC + BPD_SUFFIX
NLL_IW_BPD = NLL_IW + BPD_SUFFIX

# Samples (Frechet distances; the extractor is part of the key).
FID_PRIOR = "fid_prior"
FID_GMM = "fid_gmm"
FID_RECON = "fid_recon"
# Beside each FID, in the same features standardised by the test split's: KID (unbiased MMD^2, cubic kernel)
# and precision / recall (k-NN manifolds, k = 3).
KID_PRIOR = "kid_prior"
KID_GMM = "kid_gmm"
KID_RECON = "kid_recon"
PRECISION_PRIOR = "precision_prior"
RECALL_PRIOR = "recall_prior"
PRECISION_GMM = "precision_gmm"
RECALL_GMM = "recall_gmm"
PRECISION_RECON = "precision_recon"
RECALL_RECON = "recall_recon"
# The sample-quality keys of each sample source, by the name of the value in `SampleQuality.compute()`.
SAMPLE_QUALITY = {
    FID_PRIOR: {"fid": FID_PRIOR, "kid": KID_PRIOR, "precision": PRECISION_PRIOR, "recall": RECALL_PRIOR},
    FID_GMM: {"fid": FID_GMM, "kid": KID_GMM, "precision": PRECISION_GMM, "recall": RECALL_GMM},
    FID_RECON: {"fid": FID_RECON, "kid": KID_RECON, "precision": PRECISION_RECON, "recall": RECALL_RECON},
}

# Latent Gaussianity of the aggregate posterior.
GAUSS_KL = "gauss_kl"
GAUSS_MMD = "gauss_mmd"
GAUSS_SWD = "gauss_swd"
MARDIA_SKEW = "mardia_skew"
MARDIA_KURT = "mardia_kurt"
MARDIA_SKEW_P = "mardia_skew_p"
MARDIA_KURT_P = "mardia_kurt_p"
HZ_STAT = "hz_stat"
HZ_P = "hz_p"
KS_FRAC = "ks_frac"
PRIOR_HOLES = "prior_holes"
KNN_KL = "knn_kl"
ACTIVE_UNITS = "active_units"
TOTAL_CORRELATION = "total_correlation"
# Sample size of the battery and the plug-in estimates' expectation on exact N(0, I) codes of that size.
GAUSS_KL_NULL = "gauss_kl_null"
TOTAL_CORRELATION_NULL = "total_correlation_null"
CODES_N = "codes_n"                        # codes the battery ran on (a seeded subset of at most max_codes)
PRIOR_HOLES_FIT_N = "prior_holes_fit_n"    # codes prior_holes fits its mixture on (codes_n // 2)

HIGHER_IS_BETTER = {
    ELBO_POSTHOC: True, DISTORTION_POSTHOC: False, RATE_POSTHOC: None,
    ELBO: True, DISTORTION: False, RATE: None, ELBO_EXPOST: True, NLL_IW: False,
    **{nll_iw_k(k): False for k in IW_LADDER},
    ELBO_BPD: False, ELBO_EXPOST_BPD: False, ELBO_POSTHOC_BPD: False, NLL_IW_BPD: False,
    FID_PRIOR: False, FID_GMM: False, FID_RECON: False, KID_PRIOR: False, KID_GMM: False, KID_RECON: False,
    PRECISION_PRIOR: True, RECALL_PRIOR: True, PRECISION_GMM: True, RECALL_GMM: True,
    PRECISION_RECON: True, RECALL_RECON: True,
    GAUSS_KL: False, GAUSS_KL_NULL: None, GAUSS_MMD: False, GAUSS_SWD: False, MARDIA_SKEW: False, MARDIA_KURT: False,
    MARDIA_SKEW_P: None, MARDIA_KURT_P: None, HZ_STAT: False, HZ_P: None, KS_FRAC: True,
    PRIOR_HOLES: False, KNN_KL: False, ACTIVE_UNITS: True, TOTAL_CORRELATION: False,
    TOTAL_CORRELATION_NULL: None, CODES_N: None, PRIOR_HOLES_FIT_N: None,
}
"""True: higher is better; False: lower is better; None: reported, not ranked."""
