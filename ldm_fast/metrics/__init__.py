"""Evaluation metrics.

image_quality  PSNR, SSIM, latent-grid edge ratio on batches in [-1, 1]
frechet        Fréchet distance, kernel distance (KID), Inception Score, k-NN precision/recall —
               on any features
inception      the standard FID InceptionV3 (weights from a local file only) and its input pipeline
features       the project's own small network: FD-shapes, class accuracy, segmentation mIoU

FID/KID/IS are named so only when computed with the Inception network; in the project's own
features the Fréchet distance is reported as FD-shapes.
"""

from ldm_fast.metrics.features import (
    FD_NAME,
    FEATURE_NET_VERSION,
    FeatureNetTraining,
    ShapesNet,
    classifier_accuracy,
    extract,
    fd_shapes,
    load_shapes_net,
    mean_iou,
    segmentation_miou,
    train_shapes_net,
)
from ldm_fast.metrics.frechet import (
    FeatureStats,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    inception_score,
    kernel_distance,
    load_statistics,
    precision_recall,
)
from ldm_fast.metrics.image_quality import QualityResult, grid_ratio, psnr, ssim
from ldm_fast.metrics.inception import (
    DEFAULT_MODE as FID_DEFAULT_MODE,
    RESIZE_MODES as FID_MODES,
    FIDInceptionV3,
    InceptionWeightsUnavailable,
    inception_features,
    load_fid_inception,
    resize_for_inception,
)

__all__ = [
    "FD_NAME", "FEATURE_NET_VERSION", "FeatureNetTraining", "ShapesNet", "classifier_accuracy",
    "extract", "fd_shapes", "load_shapes_net", "mean_iou", "segmentation_miou", "train_shapes_net",
    "FeatureStats", "feature_statistics", "frechet_distance", "frechet_distance_features",
    "inception_score", "kernel_distance", "load_statistics", "precision_recall",
    "QualityResult", "psnr", "ssim",
    "FIDInceptionV3", "InceptionWeightsUnavailable", "inception_features", "load_fid_inception",
    "resize_for_inception", "FID_MODES", "FID_DEFAULT_MODE",
]
