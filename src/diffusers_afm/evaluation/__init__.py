"""Sample-quality metrics (FID, Inception Score, precision and recall) and their feature networks."""

from .features import (
    TORCH_FIDELITY_WEIGHTS,
    FeatureExtractor,
    ModuleFeatureExtractor,
    TorchScriptFeatureExtractor,
    compute_features,
    images_from_folder,
    load_feature_extractor,
    reference_statistics_from_dataset,
    reference_statistics_from_folder,
    reference_statistics_from_npz,
    save_statistics,
    to_unit_nchw,
    torch_fidelity_inception,
)
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = [
    "TORCH_FIDELITY_WEIGHTS",
    "FeatureExtractor",
    "ModuleFeatureExtractor",
    "TorchScriptFeatureExtractor",
    "compute_features",
    "feature_statistics",
    "frechet_distance",
    "images_from_folder",
    "inception_score",
    "load_feature_extractor",
    "precision_recall",
    "reference_statistics_from_dataset",
    "reference_statistics_from_folder",
    "reference_statistics_from_npz",
    "save_statistics",
    "to_unit_nchw",
    "torch_fidelity_inception",
]
