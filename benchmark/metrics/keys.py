"""Metric keys shared by evaluation, run records, the leaderboard and the tests.

Each key maps to the direction in which the metric improves, so that ranking never guesses.
"""

# Likelihood (nats per image unless the key says otherwise).
ELBO = "elbo"
DISTORTION = "distortion"          # -E_q[log p(x|z)]
RATE = "rate"                      # KL(q(z|x) || p(z))
ELBO_BPD = "elbo_bpd"              # -elbo in bits per dimension
ELBO_EXPOST = "elbo_expost"        # ELBO of a fitted ex-post Gaussian posterior (deterministic encoders)
NLL_IW = "nll_iw"                  # -log p(x) by importance sampling (IWAE bound L_K)

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

HIGHER_IS_BETTER = {
    ELBO: True, DISTORTION: False, RATE: None, ELBO_BPD: False, ELBO_EXPOST: True, NLL_IW: False,
    FID_PRIOR: False, FID_GMM: False, FID_RECON: False, KID_PRIOR: False, KID_GMM: False, KID_RECON: False,
    PRECISION_PRIOR: True, RECALL_PRIOR: True, PRECISION_GMM: True, RECALL_GMM: True,
    PRECISION_RECON: True, RECALL_RECON: True,
    GAUSS_KL: False, GAUSS_MMD: False, GAUSS_SWD: False, MARDIA_SKEW: False, MARDIA_KURT: False,
    MARDIA_SKEW_P: None, MARDIA_KURT_P: None, HZ_STAT: False, HZ_P: None, KS_FRAC: True,
    PRIOR_HOLES: False, KNN_KL: False, ACTIVE_UNITS: True, TOTAL_CORRELATION: False,
}
"""True: higher is better; False: lower is better; None: reported, not ranked."""
