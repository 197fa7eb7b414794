"""Frozen teachers whose patch features VQ-KD distils: HF transformers, timm, open_clip, or a beitv2 checkpoint.

A `Teacher` takes the tokenizer's own [0, 1] view and returns features on the tokenizer's patch grid, so any
teacher fits any tokenizer: it resizes the input to its own resolution (the official code has no such step: its
``--teacher_input_size`` is never used), applies its own normalisation, and resamples its feature
map to the tokenizer grid when the two differ. It runs frozen, in eval mode, without gradients, in bf16 autocast when
asked (the official teacher runs inside fp16 autocast).

What each adapter returns (last layer, prefix tokens dropped):

* CLIP (HF ``clip``/``clip_vision_model``, open_clip): every patch token through the final layernorm and the visual
  projection, exactly the official target ``ln_post(x)[:, 1:] @ proj``.
* DINO (HF ``vit``), DINOv2 (``dinov2``, ``dinov2_with_registers``), timm: patch tokens after the final norm.
* SigLIP (HF ``siglip``/``siglip_vision_model``): all tokens (no CLS) after ``post_layernorm``.
* beitv2 checkpoints: `BEiTViT.patch_features` (final ``norm``, or ``fc_norm`` when mean-pooling).
"""

from .adapters import BEiTTeacher, HFTeacher, OpenCLIPTeacher, TimmTeacher
from .base import Teacher, infer_grid
from .build import TeacherConfig, build_teacher
from .hub import hub_reachable

__all__ = ["BEiTTeacher", "HFTeacher", "OpenCLIPTeacher", "Teacher", "TeacherConfig", "TimmTeacher", "build_teacher",
           "hub_reachable", "infer_grid"]
