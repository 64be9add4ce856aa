"""Distribution metrics on feature sets: Fréchet distance, kernel (KID) distance, Inception
Score, and k-NN precision/recall.

They are feature-agnostic: fed Inception pool3 features (`metrics.inception`) the Fréchet
distance is FID and the kernel distance is KID; fed the project's own network
(`metrics.features`) they are "FD-shapes"/"KD-shapes" and must be reported under that name.

All statistics are accumulated in float64: the Fréchet distance subtracts traces of large
matrices, and float32 loses the few units that separate good models.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch

def _as_2d_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return x


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------

class FeatureStats:
    """Streaming mean and covariance of features, so a large sample set never has to sit in
    memory at once: `update` per batch, then `mean()` / `cov()`.

    Accumulates Σx and Σxxᵀ around a shift (the first batch's mean) in float64, which keeps
    the one-pass covariance formula accurate when features have a large common offset.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> "FeatureStats":
        x = _as_2d_float64(features)
        if x.shape[0] == 0:
            return self
        if self._shift is None:
            d = x.shape[1]
            self._shift = x.mean(0)
            self._sum = np.zeros(d)
            self._outer = np.zeros((d, d))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature width changed: {self._shift.shape[0]} → {x.shape[1]}")
        xc = x - self._shift
        self._sum += xc.sum(0)
        self._outer += xc.T @ xc
        self.n += x.shape[0]
        return self

    def mean(self) -> np.ndarray:
        self._require(1)
        return self._shift + self._sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased (N−1) sample covariance, as numpy.cov and the reference FID code use."""
        self._require(2)
        m = self._sum / self.n
        return (self._outer - self.n * np.outer(m, m)) / (self.n - 1)

    def _require(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"need at least {k} feature vectors, have {self.n}")

    def save(self, path: str | Path) -> None:
        """Write mean, covariance and count to .npz (reference statistics for a dataset)."""
        np.savez(path, mu=self.mean(), sigma=self.cov(), n=self.n)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from an .npz written by `FeatureStats.save` (or any file with `mu` and
    `sigma` arrays, the layout the reference FID tools also use)."""
    with np.load(path) as f:
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an (N, D) feature set, or of an iterable of batches."""
    stats = FeatureStats()
    if isinstance(features, (np.ndarray, torch.Tensor)):
        stats.update(features)
    else:
        for batch in features:
            stats.update(batch)
    return stats.mean(), stats.cov()


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix; tiny negative eigenvalues (round-off) → 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^½)  (Heusel et al. 2017).

    The cross term is computed as tr((s1^½ sigma2 s1^½)^½): the same number (the two matrices
    are similar), but the argument is symmetric positive semi-definite, so its square root
    comes from an eigendecomposition with no complex round-off and no failure on singular
    covariances (fewer samples than feature dimensions). The reference code's scipy `sqrtm`
    of the non-symmetric product needs an ε·I offset and an imaginary-part check for exactly
    those cases; where it succeeds the two agree to rounding (tested).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("non-finite feature statistics (NaN/inf in the features?)")
    # Symmetrise: accumulated covariances can be asymmetric in the last bits.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Round-off can leave a −1e−12 for identical sets; the distance itself is ≥ 0.
    return max(fd, 0.0)


def frechet_distance_features(features1, features2) -> float:
    """Fréchet distance between two (N, D) feature sets (each summarised by mean/covariance)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# --------------------------------------------------------------------------------------------
# Kernel distance (KID)
# --------------------------------------------------------------------------------------------

def kernel_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                    degree: int = 3, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Unbiased squared MMD with the polynomial kernel k(x, y) = (xᵀy / D + coef0)^degree,
    averaged over random subsets (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018).

    On Inception pool3 features this is KID. Returns (mean, std) over the subsets; memory is
    bounded by the subset size (three m×m kernel matrices at a time). The estimate is unbiased,
    so for two samples of the same distribution it scatters around 0 and can be slightly
    negative: that is the estimator, not a bug.
    """
    x, y = _as_2d_float64(features1), _as_2d_float64(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("kernel distance needs at least 2 samples in each set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (a @ a.T / d + coef0) ** degree
        kyy = (b @ b.T / d + coef0) ** degree
        kxy = (a @ b.T / d + coef0) ** degree
        # Unbiased: the within-set sums leave out the diagonal k(x_i, x_i).
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals[i] = within - 2.0 * kxy.sum() / (m * m)
    return float(vals.mean()), float(vals.std())


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------

def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) ‖ p(y))) over `splits` consecutive chunks; returns (mean, std)
    (Salimans et al., "Improved Techniques for Training GANs", 2016).

    `probs` are class probabilities (N, K), rows summing to 1 — softmax of the Inception
    logits for IS proper. Bounds: 1 (every prediction equals the marginal) to K (confident
    predictions, classes used evenly).
    """
    p = _as_2d_float64(probs)
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("inception_score expects probabilities (rows ≥ 0 summing to 1); "
                         "apply softmax to logits first")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for chunk in np.array_split(p, splits):
        marginal = chunk.mean(0, keepdims=True)
        # x·log(x) with 0·log 0 = 0, so one-hot predictions are fine.
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(marginal)), 0.0).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# --------------------------------------------------------------------------------------------

def _row_batch(n_cols: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_cols))


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    # ‖a−b‖² = ‖a‖² + ‖b‖² − 2 aᵀb; clamped because cancellation can go slightly negative.
    return ((a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int = 3, max_elements: int = 2**25) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (the point
    itself excluded), computed in row blocks of at most `max_elements` distances."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points to estimate a k-NN manifold, got {n}")
    sq = (features * features).sum(1)
    out = torch.empty(n, dtype=features.dtype, device=features.device)
    step = _row_batch(n, max_elements)
    for i in range(0, n, step):
        d = _pairwise_sq_dists(features[i:i + step], features, sq)
        # Index k of the sorted row: index 0 is the point itself at distance 0.
        out[i:i + step] = d.kthvalue(k + 1, dim=1).values
    return out


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                      max_elements: int = 2**25) -> torch.Tensor:
    """For each query, whether it lies inside any support point's k-NN ball (boolean (Q,))."""
    sq = (support * support).sum(1)
    out = torch.empty(queries.shape[0], dtype=torch.bool, device=queries.device)
    step = _row_batch(support.shape[0], max_elements)
    for i in range(0, queries.shape[0], step):
        d = _pairwise_sq_dists(queries[i:i + step], support, sq)
        out[i:i + step] = (d <= radii[None, :]).any(1)
    return out


def precision_recall(real_features, fake_features, k: int = 3, max_elements: int = 2**25,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), k = 3 as in the paper.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour. Precision: fraction of generated samples inside the real manifold
    (fidelity). Recall: fraction of real samples inside the generated manifold (coverage).
    Distances are computed in float32 blocks of at most `max_elements` entries, on `device`
    (default: where the features are), so 50k × 50k sets fit in a few hundred MB.
    """
    def prep(f):
        t = f if isinstance(f, torch.Tensor) else torch.as_tensor(np.asarray(f))
        if t.dim() != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
        return t.detach().to(device=device or t.device, dtype=torch.float32)

    real, fake = prep(real_features), prep(fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
    real_r = knn_radii(real, k, max_elements)
    fake_r = knn_radii(fake, k, max_elements)
    precision = manifold_coverage(fake, real, real_r, max_elements).float().mean().item()
    recall = manifold_coverage(real, fake, fake_r, max_elements).float().mean().item()
    return precision, recall
