"""Invariants of benchmark.metrics.fid: no snapshots, tiny synthetic data, well under a minute on 2 CPU cores."""

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmark.errors import UsageError
from benchmark.metrics import extractors, fid
from helpers import free_port
from conftest import FlattenFeatures

SHARED = Path(__file__).parents[1].parent / "shared"
INCEPTION_TORCHSCRIPT = SHARED / "models" / extractors.INCEPTION_TORCHSCRIPT_FILE
TORCH_FIDELITY_WEIGHTS = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


def frechet_reference(mu1, sigma1, mu2, sigma2) -> float:
    """Heusel et al. (2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images in [0, 1]: one fixed random template per class (10 classes) plus noise."""
    templates = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    noise = 0.3 * torch.rand(n, 1, 8, 8, generator=generator)
    return (0.7 * templates[labels] + noise).clamp(0, 1), labels


def json_meta(cache_dir: Path, extractor) -> dict:
    """The human-readable metadata written beside a cached domain network."""
    return json.loads((cache_dir / "fid" / f"{extractor.tag}.json").read_text())


# Tiny tensors gain nothing from threads: on a busy 2-core machine OpenMP barriers made these tests 20x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


TRAINING = dict(epochs=1, min_steps=40, batch_size=64)  # seconds, not minutes


@pytest.fixture(scope="module")
def digits():
    return synthetic_digits(600, seed=1)


@pytest.fixture(scope="module")
def domain_extractor(digits, tmp_path_factory):
    images, labels = digits
    return extractors.build_feature_extractor("domain", dataset="digits", train_images=images, train_labels=labels,
                                       cache_dir=tmp_path_factory.mktemp("cache"), **TRAINING)


def test_registry_fails_loudly():
    with pytest.raises(KeyError, match="unknown feature extractor 'vgg'.*'domain', 'inception'"):
        extractors.build_feature_extractor("vgg")
    with pytest.raises(ValueError, match="already registered"):
        extractors.register_feature_extractor("domain")(lambda: None)
    extractors.register_feature_extractor("not-an-extractor")(lambda: torch.nn.Identity())
    try:
        with pytest.raises(TypeError, match="not a FeatureExtractor"):
            extractors.build_feature_extractor("not-an-extractor")
    finally:
        del extractors.FEATURE_EXTRACTORS["not-an-extractor"]


def test_a_builder_gets_the_run_context_its_signature_names_and_no_more():
    seen = {}

    def only_dataset(dataset, scale=1):
        seen["only_dataset"] = dict(dataset=dataset, scale=scale)
        return FlattenFeatures(4)

    def everything(**kwargs):
        seen["everything"] = kwargs
        return FlattenFeatures(4)

    context = dict(dataset="digits", train_images=torch.zeros(2, 1, 2, 2), train_labels=torch.zeros(2),
                   cache_dir=None, weights_path=None)
    extractors.register_feature_extractor("only-dataset")(only_dataset)
    extractors.register_feature_extractor("everything")(everything)
    try:
        extractors.build_feature_extractor("only-dataset", context, scale=2)
        assert seen["only_dataset"] == {"dataset": "digits", "scale": 2}
        extractors.build_feature_extractor("everything", context)
        assert set(seen["everything"]) == set(extractors.RUN_CONTEXT)
        with pytest.raises(TypeError, match="scael"):  # a misspelt keyword is not swallowed
            extractors.build_feature_extractor("only-dataset", context, scael=2)
    finally:
        del extractors.FEATURE_EXTRACTORS["only-dataset"], extractors.FEATURE_EXTRACTORS["everything"]


def test_a_builder_that_needs_what_no_run_gives_fails_before_training():
    from benchmark.evaluation import check_extractor
    from benchmark.spec import EvaluationConfig

    assert extractors.unmet_parameters("domain") == [] and extractors.unmet_parameters("inception") == []
    extractors.register_feature_extractor("needs-width")(lambda dataset, width: FlattenFeatures(width))
    try:
        with pytest.raises(UsageError, match=r"'needs-width' requires \['width'\], which a run does not give"):
            check_extractor(EvaluationConfig(fid_samples=10, fid_extractor="needs-width"))
    finally:
        del extractors.FEATURE_EXTRACTORS["needs-width"]


def test_extractors_reject_images_outside_unit_range(domain_extractor, digits):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        domain_extractor(2 * digits[0][:4] - 1)


def test_fid_of_a_set_against_itself_is_zero(domain_extractor, digits):
    images = digits[0]
    other = synthetic_digits(600, seed=2)[0]
    assert fid.frechet_distance(images, other, domain_extractor) > 1e-2
    assert fid.frechet_distance(images, images, domain_extractor) == pytest.approx(0, abs=1e-4)


def test_fid_of_gaussian_features_equals_the_closed_form():
    generator = np.random.default_rng(0)
    dim, n = 4, 20_000
    mu1, mu2 = generator.normal(size=dim), generator.normal(size=dim)
    a1, a2 = generator.normal(size=(dim, dim)), generator.normal(size=(dim, dim))
    sigma1, sigma2 = a1 @ a1.T + 0.1 * np.eye(dim), a2 @ a2.T + 0.1 * np.eye(dim)
    f1 = generator.multivariate_normal(mu1, sigma1, size=n).astype(np.float32)
    f2 = generator.multivariate_normal(mu2, sigma2, size=n).astype(np.float32)

    value = fid.frechet_distance(torch.from_numpy(f2).view(n, dim, 1, 1), torch.from_numpy(f1).view(n, dim, 1, 1),
                                 FlattenFeatures(dim), batch_size=3000)

    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    sample = frechet_reference(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert value == pytest.approx(sample, rel=1e-5)  # the same estimator, exactly
    assert value == pytest.approx(frechet_reference(mu1, sigma1, mu2, sigma2), rel=0.02)  # and it is consistent


def test_batch_size_does_not_change_fid(domain_extractor, digits):
    real, fake = digits[0][:200], synthetic_digits(100, seed=3)[0]
    values = [fid.frechet_distance(fake, real, domain_extractor, batch_size=b) for b in (1, 7, 500)]
    assert values == pytest.approx([values[-1]] * 3, rel=1e-5)


def test_domain_features_in_chunks_channels_last_equal_one_plain_batch(domain_extractor, digits):
    images = digits[0][: 2 * extractors.DomainFeatureExtractor.cpu_chunk + 50]  # two chunks and a remainder
    plain = copy.deepcopy(domain_extractor.classifier).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        expected = plain.features(images.contiguous())
        got = domain_extractor(images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_statistics_are_cached_and_equal_to_raw_images(domain_extractor, digits, tmp_path, monkeypatch):
    real, fake = digits[0][:300], synthetic_digits(100, seed=4)[0]
    stats = fid.reference_statistics("digits", real, domain_extractor, cache_dir=tmp_path)
    assert len(list((tmp_path / "fid").glob(f"reference-digits-{domain_extractor.tag}-*.pt"))) == 1
    monkeypatch.setattr(fid, "features_to_reference_statistics", lambda *a, **k: pytest.fail("recomputed"))
    cached = fid.reference_statistics("digits", real, domain_extractor, cache_dir=tmp_path)
    assert cached.num_samples == stats.num_samples == 300
    assert torch.equal(cached.features_cov_sum, stats.features_cov_sum)
    monkeypatch.undo()
    assert fid.frechet_distance(fake, cached, domain_extractor) == pytest.approx(
        fid.frechet_distance(fake, real, domain_extractor), rel=1e-6)


def test_domain_extractor_is_cached_by_checksum_and_trained_deterministically(digits, tmp_path, monkeypatch):
    images, labels = digits
    first = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, **TRAINING)
    assert 0.5 < first.meta["val_accuracy"] <= 1  # chance is 0.1
    assert json_meta(tmp_path, first)["val_accuracy"] == first.meta["val_accuracy"]

    monkeypatch.setattr(extractors, "_train_domain_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, **TRAINING)
    assert again.tag == first.tag
    assert torch.equal(again(images[:8]), first(images[:8]))
    monkeypatch.undo()

    changed = images.clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]
    other = extractors.domain_feature_extractor("digits", changed, labels, cache_dir=tmp_path, **TRAINING)
    assert other.tag != first.tag and len(list((tmp_path / "fid").glob("domain-digits-*.pt"))) == 2

    elsewhere = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path / "b", **TRAINING)
    assert all(torch.equal(p, q) for p, q in zip(elsewhere.state_dict().values(), first.state_dict().values()))


def test_the_augmentation_is_part_of_the_cache_key(digits, tmp_path):
    images, labels = digits
    plain = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, augment="none",
                                         normalize=False, **TRAINING)
    dimmed = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, augment="intensity",
                                          normalize=False, **TRAINING)
    assert plain.tag != dimmed.tag and (plain.meta["augment"], dimmed.meta["augment"]) == ("none", "intensity")
    with pytest.raises(UsageError, match="augmentation"):
        extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, augment="blurry", **TRAINING)


def test_a_max_normalised_extractor_sees_a_dimmed_digit_as_the_digit(digits, tmp_path):
    images, labels = digits
    plain = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, normalize=False, **TRAINING)
    normed = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, **TRAINING)  # the default
    assert normed.tag != plain.tag and normed.meta["normalize"] is True
    x = images[:16]
    assert torch.allclose(normed(0.6 * x), normed(x), atol=1e-5)  # dimming is invisible to it by construction
    assert not torch.allclose(plain(0.6 * x), plain(x), atol=1e-2)
    assert not torch.allclose(normed(extractors.gaussian_blur(x, 1.0)), normed(x), atol=1e-2)  # blur is not
    reloaded = extractors.domain_feature_extractor("digits", images, labels, cache_dir=tmp_path, **TRAINING)
    assert torch.equal(reloaded(x), normed(x))


def test_reference_features_are_cached_and_equal_the_extracted_ones(domain_extractor, digits, tmp_path,
                                                                      monkeypatch):
    real = digits[0][:300]
    features = fid.reference_features("digits", real, domain_extractor, cache_dir=tmp_path)
    assert torch.equal(features, fid.images_to_features(real, domain_extractor)) and features.shape == (300, 128)
    monkeypatch.setattr(fid, "images_to_features", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(fid.reference_features("digits", real, domain_extractor, cache_dir=tmp_path), features)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(extractors.CACHE_ENV, str(tmp_path))
    assert extractors.fid_cache_dir() == tmp_path / "fid"
    assert extractors.fid_cache_dir(tmp_path / "x") == tmp_path / "x" / "fid"


def _fid_on_rank(rank: int, world_size: int, port: int, reference, fake, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = fid.FrechetDistanceToReference(FlattenFeatures(fake.shape[1]), reference)
        for batch in fake.chunk(world_size)[rank].split(50):  # each rank sees only its shard
            metric.update(batch)
        (out / f"rank{rank}.txt").write_text(repr(float(metric.compute())))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)  # a rank that never joins the process group would otherwise hang the suite
def test_fakes_split_across_ddp_ranks_give_the_single_process_fid(tmp_path):
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(500, 3, 1, 1, generator=generator)
    fake = 0.5 + 2 * torch.randn(400, 3, 1, 1, generator=generator)
    extractor = FlattenFeatures(3)
    reference = fid.images_to_reference_statistics(real, extractor)
    single = fid.frechet_distance(fake, reference, extractor)

    port = free_port()
    # fork, where there is one, skips re-importing torch in each rank (seconds on 2 cores)
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_fid_on_rank, args=(2, port, reference, fake, tmp_path), nprocs=2, start_method=start_method)
    per_rank = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    # Had every rank loaded the reference, the synced sums would count it twice and scale its covariance
    # by 2(n - 1)/(2n - 1): a change of about 1e-3 here, far beyond float rounding.
    assert per_rank[0] == per_rank[1] == pytest.approx(single, rel=1e-6)


@pytest.mark.skipif(not INCEPTION_TORCHSCRIPT.exists(), reason=f"{INCEPTION_TORCHSCRIPT} is absent (../shared)")
def test_torchscript_inception_gives_finite_2048d_features_and_survives_pickling():
    extractor = extractors.build_feature_extractor("inception", weights_path=INCEPTION_TORCHSCRIPT)
    assert isinstance(extractor, extractors.TorchScriptInceptionV3)
    gray = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = extractor(gray)  # (2, 2048)
    assert features.shape == (2, 2048) and torch.isfinite(features).all() and (features >= 0).all()
    # ddp_spawn pickles the LightningModule; a grayscale image is its replicated RGB image
    restored = pickle.loads(pickle.dumps(extractor))
    torch.testing.assert_close(restored(gray.expand(-1, 3, -1, -1)), features)


@pytest.mark.skipif(not (TORCH_FIDELITY_WEIGHTS.exists() and INCEPTION_TORCHSCRIPT.exists()),
                    reason="torch-fidelity's Inception weights are not available offline here, so its standard "
                           "path could not be compared with the TorchScript port on this machine")
def test_torch_fidelity_inception_agrees_with_the_torchscript_port():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    standard = extractors.build_feature_extractor("inception", weights_path=TORCH_FIDELITY_WEIGHTS)(images)
    port = extractors.build_feature_extractor("inception", weights_path=INCEPTION_TORCHSCRIPT)(images)
    torch.testing.assert_close(port, standard, rtol=1e-3, atol=1e-3)
