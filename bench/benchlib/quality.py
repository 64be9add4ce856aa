"""Sample quality for the benchmarks: FD-shapes (and FID when its weights exist) against a fixed
reference set, with the bootstrap noise of the estimate."""

from __future__ import annotations

import torch

from benchlib.results import log

class QualityProbe:
    """Distance of generated images to a fixed reference set: FD-shapes (the project's own
    feature network — never called FID), and FID when the Inception weights are on this
    machine (${LDM_FID_INCEPTION}); each with a bootstrap estimate of its sampling noise.

    quick: a feature network trained for a few seconds, cached apart from the real one
    (`cache_dir`), for smoke runs whose numbers mean nothing."""

    def __init__(self, resolution: int, reference_images: torch.Tensor, quick: bool = False,
                 cache_dir=None, inception: str | None = None, log_fn=None):
        import numpy as np  # noqa: F401 - numpy is a hard dependency of the metrics

        from ldm_fast.metrics import (FD_NAME, FeatureNetTraining, InceptionWeightsUnavailable,
                                      extract, feature_statistics, load_fid_inception,
                                      load_shapes_net)
        self.fd_name = FD_NAME
        feat_cfg = FeatureNetTraining(steps=40, train_size=256, heldout_size=64) if quick else None
        if quick and cache_dir is None:
            raise ValueError("quick feature networks need their own cache_dir (they must never "
                             "replace the real cached network)")
        self.net = load_shapes_net(resolution, cache_dir=cache_dir, cfg=feat_cfg,
                                   log=log_fn or (lambda m: log(m)))
        self._extract = extract
        self.reference_n = len(reference_images)
        self.ref_stats = feature_statistics(extract(self.net, reference_images).features)
        self.inception, self.fid_unavailable = None, None
        try:
            self.inception = load_fid_inception(inception)
        except InceptionWeightsUnavailable as e:
            self.fid_unavailable = str(e).split(". ")[0]
        if self.inception is not None:
            from ldm_fast.metrics import inception_features
            self._inception_features = inception_features
            self.ref_stats_fid = feature_statistics(inception_features(self.inception, reference_images)[0])

    def score(self, images: torch.Tensor, n_boot: int = 100, seed: int = 0) -> dict:
        """{'fd_shapes', 'fd_shapes_noise', 'n', ('fid', 'fid_noise')}: *_noise is the bootstrap
        standard deviation over resamplings (with replacement) of the generated set — how much
        the number moves from the finite sample alone."""
        feats = self._extract(self.net, images).features
        out = {"n": int(feats.shape[0])}
        out["fd_shapes"], out["fd_shapes_noise"] = fd_with_noise(feats, self.ref_stats, n_boot, seed)
        if self.inception is not None:
            pool = self._inception_features(self.inception, images)[0]
            out["fid"], out["fid_noise"] = fd_with_noise(pool, self.ref_stats_fid, n_boot, seed)
        return out


def fd_with_noise(features, ref_stats, n_boot: int = 100, seed: int = 0) -> tuple[float, float]:
    """(Fréchet distance of `features` to the reference statistics, bootstrap std)."""
    import numpy as np

    from ldm_fast.metrics import feature_statistics, frechet_distance

    fd = frechet_distance(*feature_statistics(features), *ref_stats)
    rng = np.random.default_rng(seed)
    n = features.shape[0]
    boots = [frechet_distance(*feature_statistics(features[rng.integers(0, n, n)]), *ref_stats)
             for _ in range(n_boot)]
    return fd, float(np.std(boots, ddof=1)) if n_boot > 1 else float("nan")
