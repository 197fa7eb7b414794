"""Checkpoint interoperability: official microsoft/unilm BEiT v2 / VQ-KD `.pth` in, timm and HF transformers out."""

from ..models.relpos import resize_pos_embed, resize_rel_pos_table, resize_state_dict
from .hf_export import build_hf_model, export_hf, hf_config, to_hf_state_dict
from .official import (
    CheckpointMismatchError,
    load_official_classifier,
    load_official_pretrain,
    load_official_vqkd,
    read_official_state_dict,
    resize_model,
)
from .timm_export import build_timm_model, export_timm, timm_model_args, to_timm_state_dict

__all__ = [
    "CheckpointMismatchError", "build_hf_model", "build_timm_model", "export_hf", "export_timm", "hf_config",
    "load_official_classifier", "load_official_pretrain", "load_official_vqkd", "read_official_state_dict",
    "resize_model", "resize_pos_embed", "resize_rel_pos_table", "resize_state_dict", "timm_model_args",
    "to_hf_state_dict", "to_timm_state_dict",
]
