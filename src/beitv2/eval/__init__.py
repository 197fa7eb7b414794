"""Evaluation of pre-trained backbones: linear probing, k-NN and fine-tuning (see docs/evaluation.md)."""

from .backbones import ModelSource, load_backbone
from .features import FeatureConfig, extract, layer_features, pool_tokens
from .finetune import (
    ClassificationTask,
    FinetuneModelConfig,
    WithEMA,
    build_finetune_model,
    layer_decay_scale,
    layer_id_for_vit,
    remap_state_dict,
)
from .knn import KNNConfig, knn_scores
from .linprobe import (
    FeatureDataset,
    InLoopFeatures,
    LinearProbeTask,
    ProbeConfig,
    ProbeHeads,
    ProbeSettings,
    fit_probe,
)
from .metrics import accuracy, confusion_matrix, topk_correct
from .plots import save_confusion_matrix

__all__ = [
    "ClassificationTask",
    "FeatureConfig",
    "FeatureDataset",
    "FinetuneModelConfig",
    "InLoopFeatures",
    "KNNConfig",
    "LinearProbeTask",
    "ModelSource",
    "ProbeConfig",
    "ProbeHeads",
    "ProbeSettings",
    "WithEMA",
    "accuracy",
    "build_finetune_model",
    "confusion_matrix",
    "extract",
    "fit_probe",
    "knn_scores",
    "layer_decay_scale",
    "layer_features",
    "layer_id_for_vit",
    "load_backbone",
    "pool_tokens",
    "remap_state_dict",
    "save_confusion_matrix",
    "topk_correct",
]
