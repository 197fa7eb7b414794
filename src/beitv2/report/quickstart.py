"""The quickstart's report: figures from the trained models, ``metrics.json`` content and ``report.md``."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model
from ..data.fmnist import fashion_mnist_tensors
from ..data.transforms import resolve_norm
from ..engine.precision import resolve_precision
from ..masking import BlockwiseMaskGenerator
from ..models.quantizer import WHOLE_CODEBOOK
from .atlas import codebook_atlas
from .attention import attention_figure
from .markdown import write_report
from .masks import mask_examples
from .plots import plot_training_curves, read_jsonl

log = logging.getLogger("beitv2.report")


def _last(path: Path, kind: str) -> dict:
    rows = [r for r in read_jsonl(path) if r.get("type") == kind] if path.is_file() else []
    return rows[-1] if rows else {}


def _round(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: round(float(d[k]), 4) for k in keys if isinstance(d.get(k), (int, float))}


def build_report(out: Path, plan, root: str, args, results: dict[str, dict[str, Any]], timer, teacher_desc: str,
                 teacher_spec: dict, stand_in: bool, tok_dir: Path, mim_dir: Path) -> dict[str, Any]:
    """Draw the figures, write report.md and return the content of metrics.json (``timer``: the stages so far)."""
    timings, cpu = dict(timer.stages), dict(timer.cpu)
    x_test, y_test, classes = fashion_mnist_tensors(root, train=False, subset=plan.test_subset, seed=args.seed)
    drawn = _draw_figures(out, plan, args.seed, x_test, y_test, classes, stand_in, tok_dir, mim_dir)
    tok_val = _last(tok_dir / "metrics.jsonl", "val")
    tok_epoch = _last(tok_dir / "metrics.jsonl", "epoch")
    mim_epoch = _last(mim_dir / "metrics.jsonl", "epoch")
    teacher_ft = {}
    if stand_in:
        ft = json.loads((out / "teacher" / "metrics.json").read_text())
        teacher_ft = {"classifier_acc1": ft.get("acc1"), "num_labelled": _count(out / "teacher")}
    bv2 = results["BEiT v2 (pre-trained)"]
    rnd = results["random init (same ViT)"]
    gap = (bv2["linprobe_acc1"] - rnd["linprobe_acc1"]) if None not in (bv2["linprobe_acc1"],
                                                                         rnd["linprobe_acc1"]) else None
    notes = []
    if stand_in:
        notes.append(f"The teacher is a **stand-in**: {teacher_desc}. With a real CLIP/DINO teacher pass "
                     "`--teacher.kind hf --teacher.name_or_path openai/clip-vit-base-patch16` (or a local directory).")
    else:
        notes.append(f"Teacher: {teacher_desc}.")
    if args.fast:
        notes.append("This is a `--fast` run: tiny models on a subset, a test of the pipeline, not of the method.")
    n_train = _n(plan.train_subset, 60000)
    intro = (f"BEiT v2 end to end on Fashion-MNIST (28 px grayscale, 4 px patches = a 7x7 grid) on the CPU: the "
             f"tokenizer and the pre-training see {n_train} training images; the linear probe and k-NN fit on "
             f"{_n(plan.eval_train_subset, 60000)} training images and are scored on {len(y_test)} test images. "
             f"Both read {_FEATURE_WORDS.get(plan.probe_feature, plan.probe_feature)} after the final LayerNorm of "
             "the last block. The *raw pixels* row fits the same probe and k-NN on the 784 normalised pixels: "
             "the floor a learned feature has to clear.")
    sections = {"What was measured": _measured(gap, plan, tok_val, mim_epoch, drawn["atlas"], drawn["attn"],
                                               len(classes))}
    write_report(out / "report.md", title="beitv2 quickstart: BEiT v2 on Fashion-MNIST", intro=intro, notes=notes,
                 results=_results_table(results, classes, teacher_ft), timings=timings, cpu_timings=cpu,
                 settings=_settings(plan, args, root, teacher_spec, stand_in), figures=drawn["figures"],
                 sections=sections)
    atlas = drawn["atlas"]
    return {
        "mode": args.plan,
        "teacher": {"stand_in": stand_in, "description": teacher_desc, "spec": teacher_spec, **teacher_ft},
        "results": results,
        "linprobe_gain_over_random_init": gap,
        "tokenizer": _round(tok_val, ("teacher_cos", "rec_loss", "codebook_codes_used", "codebook_perplexity",
                                      "codebook_usage")) | {"train_" + k: v for k, v in _round(
                                          tok_epoch, ("codebook_codes_used", "codebook_perplexity")).items()},
        "pretrain": _round(mim_epoch, ("loss", "mlm_acc_1", "mlm_acc_2")),
        "atlas": {k: atlas[k] for k in ("codes", "counts", "codes_used", "num_patches", "class_purity")
                  if k in atlas},
        "attention": {"centre": drawn["attn"], "cls": drawn["attn_cls"]},
        "masks": drawn["masks"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "plan": asdict(plan),
    }


def _draw_figures(out: Path, plan, seed: int, x_test: torch.Tensor, y_test: torch.Tensor, classes: list[str],
                  stand_in: bool, tok_dir: Path, mim_dir: Path) -> dict[str, Any]:
    """Every figure of the report under ``out/figures``; returns their captions -> paths and what they measured."""
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    runs = {"tokenizer": tok_dir / "metrics.jsonl", "pre-training": mim_dir / "metrics.jsonl"}
    if stand_in:
        runs = {"teacher (supervised)": out / "teacher" / "metrics.jsonl", **runs}
    panels = plot_training_curves(runs, figs / "training_curves.png", title="training curves")

    tokenizer, _, _ = load_model(tok_dir / "model.safetensors")
    atlas = codebook_atlas(tokenizer, x_test, figs / "codebook_atlas.png", top_k=16, per_code=16, labels=y_test,
                           class_names=classes, seed=seed)

    mean, std = resolve_norm("imagenet", 1)
    model, _, _ = load_model(mim_dir / "model.safetensors")
    pick = torch.stack([torch.nonzero(y_test == c)[0, 0] for c in (0, 1, 5, 7, 8, 9) if (y_test == c).any()])
    shown = x_test[pick]
    normed = (shown - mean[0]) / std[0]
    attn = attention_figure(model, normed, figs / "attention.png", layer=-1, display_images=shown,
                            title="pre-trained BEiT v2: attention of the centre patch (red) over the patches, "
                                  "last block")
    attn_cls = attention_figure(model, normed, figs / "attention_cls.png", layer=-1, query="cls",
                                display_images=shown, title="pre-trained BEiT v2: attention of the CLS token, "
                                                            "last block")
    gen = BlockwiseMaskGenerator((7, 7), plan.mask_patches, min_num_patches=plan.mask_min_block,
                                 max_num_patches=plan.mask_max_block)
    masks = mask_examples(gen, figs / "masks.png", n=8, images=x_test[:8], seed=seed,
                          title=f"blockwise masks: {plan.mask_patches} of 49 patches, blocks of "
                                f"{plan.mask_min_block}-{plan.mask_max_block} patches")
    cm = out / "eval" / "beitv2" / "linprobe" / "confusion_matrix.png"
    if cm.is_file():
        shutil.copyfile(cm, figs / "confusion_matrix_beitv2.png")
    figures = {"Training curves (" + ", ".join(panels) + ")": "figures/training_curves.png",
               "Codebook atlas: patches assigned to the most used codes": "figures/codebook_atlas.png",
               "Attention of the centre patch (pre-trained model, last block)": "figures/attention.png",
               "Attention of the CLS token (pre-trained model, last block)": "figures/attention_cls.png",
               "Blockwise masks used in pre-training": "figures/masks.png"}
    if (figs / "confusion_matrix_beitv2.png").is_file():
        figures["Linear probe confusion matrix (BEiT v2)"] = "figures/confusion_matrix_beitv2.png"
    return {"figures": figures, "atlas": atlas, "attn": attn, "attn_cls": attn_cls, "masks": masks}


def _results_table(results: dict[str, dict[str, Any]], classes: list[str], teacher_ft: dict) -> dict[str, dict]:
    table: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        table[name] = {"linear probe top-1 (%)": r.get("linprobe_acc1"), "k-NN top-1, k=20 (%)": r.get("knn_acc1")}
    if teacher_ft:
        table["teacher"]["its own classifier top-1 (%)"] = teacher_ft["classifier_acc1"]
    table["chance"] = {"linear probe top-1 (%)": 100.0 / len(classes), "k-NN top-1, k=20 (%)": 100.0 / len(classes)}
    return table


def _measured(gap: float | None, plan, tok_val: dict, mim_epoch: dict, atlas: dict, attn: dict,
              num_classes: int) -> str:
    """The report's "What was measured" section: the verdict and one line per stage."""
    verdict = ""
    if gap is not None:
        verdict = f"BEiT v2 linear probe minus random init: **{gap:+.2f} points**: " + (
            "pre-training is well above the untrained network of the same shape." if gap >= 5 else
            "pre-training is only slightly above the untrained network (within what a short run can vary by)."
            if gap > 0 else "pre-training does not beat the untrained network here (see docs/quickstart.md).")
    return verdict + "\n\n" + "\n".join([
        f"- tokenizer (test split): cosine to the teacher features {tok_val.get('teacher_cos', float('nan')):.3f},"
        f" {tok_val.get('codebook_codes_used', 'n/a')} of {plan.tok_codes} codes used, codebook perplexity "
        f"{tok_val.get('codebook_perplexity', float('nan')):.1f}",
        f"- pre-training (last epoch, training batches): masked-token accuracy "
        f"{100 * mim_epoch.get('mlm_acc_1', float('nan')):.1f}% (final head), "
        f"{100 * mim_epoch.get('mlm_acc_2', float('nan')):.1f}% (patch aggregation head)",
        f"- codebook atlas: on average {100 * atlas.get('class_purity', float('nan')):.0f}% of the patches of "
        f"a shown code come from images of one class (chance ~{100 / num_classes:.0f}%)",
        f"- attention (last block): entropy of the centre patch's attention {attn['entropy']:.2f} nats "
        f"(uniform: {attn['uniform_entropy']:.2f})",
    ])


def _precision_words() -> str:
    """What the stages' ``precision: bf16`` became on this CPU (fp32 where bf16 is only emulated)."""
    import torch

    p = resolve_precision("bf16", torch.device("cpu"))
    return "bf16 autocast" if p == "bf16" else f"{p} (this CPU has no native bf16)"


def _settings(plan, args, root: str, teacher_spec: dict, stand_in: bool) -> dict[str, Any]:
    """The report's Settings section: every choice of the run."""
    return {
        "run": {"mode": args.plan, "threads": args.threads, "seed": args.seed,
                "data": root, "precision": _precision_words()},
        "teacher": teacher_spec | ({"architecture": "timm resnet10t, widths 32/48/64/96, 56 px, output stride 8"
                                    if plan.teacher_arch == "cnn" else
                                    f"ViT (width, depth, heads) {tuple(plan.teacher_vit)}",
                                    "labelled images": _subset_words_n(plan.teacher_labels),
                                    "epochs": plan.teacher_epochs} if stand_in else {}),
        "tokenizer (VQ-KD)": {"encoder (width, depth, heads)": plan.tok_vit, "decoder depth": 1,
                              "codebook": f"{plan.tok_codes} x {plan.tok_code_dim}",
                              "unused codes": _remedy_words(plan.tok_whole_codebook),
                              "epochs": plan.tok_epochs,
                              "batch": plan.tok_batch, "lr": plan.tok_lr},
        "pre-training (BEiT v2)": {"ViT (width, depth, heads)": plan.mim_vit,
                                   "patch aggregation": f"patch tokens of block {plan.mim_early_layers} + final "
                                                        f"CLS through a 2-block head, shared lm_head",
                                   "masking": f"blockwise, {plan.mask_patches} of 49 patches "
                                              f"({100 * plan.mask_patches / 49:.0f}%), blocks of "
                                              f"{plan.mask_min_block}-{plan.mask_max_block} patches (official: 75 "
                                              "of 196, blocks of at least 16)",
                                   "views": ("the whole image, random flips" if plan.mim_crop_scale >= 1 else
                                             f"RandomResizedCrop scale [{plan.mim_crop_scale}, 1], random flips"),
                                   "epochs": plan.mim_epochs, "batch": plan.mim_batch, "lr": plan.mim_lr},
        "evaluation": {"linear probe": f"BatchNorm (no affine) + linear head, AdamW, {plan.probe_epochs} "
                                       f"epochs, batch {plan.probe_batch}, on cached features",
                       "k-NN": f"k in {list(plan.knn_k)}, T=0.07, cosine",
                       "features": f"{plan.probe_feature}: {_FEATURE_WORDS.get(plan.probe_feature, '')} after the "
                                   "final norm, last block"},
        "configs": "each command stage's YAML is in configs/, named <command>[.<backbone>].yaml (rerun one with "
                   "`beitv2 <command> --config configs/<command>[.<backbone>].yaml`); the stand-in teacher's training, "
                   "which no command runs, is recorded in teacher/config.yaml",
    }


_FEATURE_WORDS = {"cls+mean": "the concatenation of the CLS token and the mean patch token",
                  "cls+grid3": "the CLS token and the patch tokens average-pooled to a 3x3 grid (10 tokens "
                               "concatenated)",
                  "cls+grid2": "the CLS token and the patch tokens average-pooled to a 2x2 grid (5 tokens "
                               "concatenated)"}


def _n(subset: float, total: int) -> int:
    return total if subset <= 0 else (round(total * subset) if subset < 1 else min(int(subset), total))


def _remedy_words(whole_codebook: bool) -> str:
    if not whole_codebook:
        return "no remedy (the paper)"
    options = ", ".join(f"{k} {v}" for k, v in WHOLE_CODEBOOK.items())
    return f"use_whole_codebook: dead-code restart and diversity loss ({options})"


def _subset_words_n(subset: float) -> str:
    return f"{100 * subset:.0f}% of the training set" if 0 < subset < 1 else f"{int(subset)}"


def _count(teacher_dir: Path) -> int | None:
    """Number of labelled images the teacher trained on, read back from its finetune config."""
    import yaml

    ft = teacher_dir / "metrics.json"
    if ft.is_file() and "num_images" in json.loads(ft.read_text()):  # the CNN stand-in records it
        return int(json.loads(ft.read_text())["num_images"])
    cfg = teacher_dir.parent / "configs" / "finetune.teacher.yaml"
    if not cfg.is_file():
        return None
    sub = float(yaml.safe_load(cfg.read_text())["data"]["subset"])
    return round(60000 * sub) if 0 < sub < 1 else int(sub)
