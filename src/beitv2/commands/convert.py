"""`beitv2 convert`: official microsoft/unilm checkpoints in; our model files, timm and HF transformers out."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from ..checkpoint import load_model, read_metadata, save_model
from ..config import ConfigError, check_output_dir, one_line, reading
from ..interop import (
    CheckpointMismatchError,
    export_hf,
    export_timm,
    load_official_classifier,
    load_official_pretrain,
    load_official_vqkd,
    resize_model,
)
from ..interop.dalle import load_dalle
from ..interop.hf_segmentation import export_hf_segmentation, recorded_export_options
from ..interop.hub import save_for_hub
from ..interop.preprocessing import preprocessing_of, read_run_config
from ._training import add_print_config, maybe_print_config

HELP = "convert official BEiT v2 / VQ-KD checkpoints and our models to beitv2, timm or HF transformers"
DESCRIPTION = """\
Convert checkpoints between formats.

  --from official-vqkd      official VQ-KD tokenizer .pth (vqkd_encoder_base_decoder_*); to timm/hf: its encoder
  --from official-pretrain  official BEiT v2 pre-training .pth (beit_*_8k_vocab[_cls_pt])
  --from official-finetune  official fine-tuned classifier .pth
  --from dalle              OpenAI DALL-E dVAE encoder.pkl (BEiT v1's tokenizer; --decoder decoder.pkl adds its
                            decoder), read without running pickled code; to beitv2 only
  --from beitv2             a model file written by this library (save_model)

  --to beitv2               our safetensors model file (OUTPUT is a file)
  --to timm                 folder for timm.create_model('local-dir:OUTPUT', pretrained=True)
  --to hf                   folder for transformers BeitModel / BeitForImageClassification.from_pretrained(OUTPUT)
                            (a `beitv2 segment` model: BeitForSemanticSegmentation), with preprocessor_config.json
                            (AutoImageProcessor, pipeline), id2label and a model card
  --to hub                  folder to upload to the HF hub as is (our model.safetensors, config.json, README.md);
                            read back with hf-hub:ORG/NAME wherever a checkpoint path is taken

INPUT may be hf-hub:ORG/NAME[@REVISION] (through huggingface_hub: its cache and HF_HUB_OFFLINE=1 apply). Class
names and input normalisation recorded by `beitv2 finetune` go into the timm / HF exports.

Examples:
  beitv2 convert --from official-vqkd --to beitv2 vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth vqkd.safetensors
  beitv2 convert --from official-pretrain --to beitv2 --target finetune --model.img_size 384 \\
      --model.num_classes 1000 beitv2_base_patch16_224_pt1k.pth ft384.safetensors
  beitv2 convert --from beitv2 --to hf runs/ft/model.safetensors hf_model/
  beitv2 convert --from dalle --to beitv2 --decoder decoder.pkl encoder.pkl dall_e_dvae.safetensors

Model options use the dotted names of the other commands (--model.img_size, --model.num_classes, ...); the older
spellings (--img-size, --num-classes, --num-heads, --decoder-num-heads, --early-layers, --preset) still work.
"""

SOURCES = ("official-vqkd", "official-pretrain", "official-finetune", "dalle", "beitv2")
TARGETS = ("beitv2", "timm", "hf", "hub")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="input format")
    parser.add_argument("--to", dest="dest", required=True, choices=TARGETS, help="output format")
    parser.add_argument("--model.img_size", "--img-size", dest="img_size", default=None, metavar="PX",
                        help="target resolution: PX or HxW; position tables are resized (official cubic)")
    parser.add_argument("--target", choices=("mim", "finetune"), default="mim",
                        help="official-pretrain: continued pre-training model, or fine-tuning backbone")
    parser.add_argument("--model.num_classes", "--num-classes", dest="num_classes", type=int, default=None,
                        help="official-pretrain --target finetune: classifier outputs (default 0 = no head)")
    parser.add_argument("--model.num_heads", "--num-heads", dest="num_heads", type=int, default=None,
                        help="attention heads where no relative position table tells (default width / 64)")
    parser.add_argument("--model.decoder_num_heads", "--decoder-num-heads", dest="decoder_num_heads", type=int,
                        default=None, help="official-vqkd: decoder heads")
    parser.add_argument("--model.early_layers", "--early-layers", dest="early_layers", type=int, default=None,
                        help="official-pretrain: block feeding the patch aggregation head (default depth - 3)")
    parser.add_argument("--model.preset", "--preset", dest="preset", default=None,
                        help="official-vqkd: load into this named architecture instead of inferring it")
    parser.add_argument("--decoder", type=Path, default=None, help="dalle: DALL-E's decoder.pkl")
    parser.add_argument("--rel-pos", "--rel_pos", dest="rel_pos", choices=("per_layer", "shared"), default=None,
                        help="timm/hf: relative position layout (default: timm per_layer, hf as in the model)")
    add_print_config(parser)
    parser.add_argument("input", type=Path, help="input checkpoint (or hf-hub:ORG/NAME for --from beitv2)")
    parser.add_argument("output", type=Path, help="output file (beitv2) or folder (timm, hf)")


def _img_size(args: argparse.Namespace):
    if args.img_size is None:
        return None
    text = " ".join(args.img_size) if isinstance(args.img_size, list) else str(args.img_size)
    try:
        sizes = [int(v) for v in text.lower().replace("x", " ").replace(",", " ").split()]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise ConfigError(f"model.img_size: takes PX, H W or HxW (positive integers), got {text!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def load_input(args: argparse.Namespace):
    img_size = _img_size(args)
    if args.num_classes is not None and not (args.source == "official-pretrain" and args.target == "finetune"):
        raise ConfigError("model.num_classes: applies to --from official-pretrain --target finetune only")
    if args.source == "official-vqkd":
        if img_size is not None:
            raise ConfigError("model.img_size: not supported for VQ-KD tokenizers")
        return load_official_vqkd(args.input, architecture=args.preset, num_heads=args.num_heads,
                                  decoder_num_heads=args.decoder_num_heads)
    if args.preset is not None:
        raise ConfigError("model.preset: applies to --from official-vqkd only")
    if args.decoder is not None and args.source != "dalle":
        raise ConfigError("decoder: applies to --from dalle only")
    if args.source == "dalle":
        if args.dest != "beitv2":
            raise ConfigError("to: --from dalle converts to --to beitv2 only (a dVAE has no timm / HF form)")
        if isinstance(img_size, tuple):
            raise ConfigError("model.img_size: one value (square) for a DALL-E dVAE")
        with reading("decoder"):
            if args.decoder is not None and not args.decoder.is_file():
                raise FileNotFoundError(f"not found: {args.decoder}")
        return load_dalle(args.input, args.decoder, img_size=img_size or 112)
    if args.source == "official-pretrain":
        return load_official_pretrain(args.input, target=args.target, img_size=img_size,
                                      num_classes=args.num_classes or 0, early_layers=args.early_layers,
                                      num_heads=args.num_heads)
    if args.source == "official-finetune":
        return load_official_classifier(args.input, img_size=img_size, num_heads=args.num_heads)
    model, kind, _ = load_model(args.input)
    if kind not in ("vit", "mim", "vqkd", "segmenter"):
        raise ValueError(f"{args.input} holds a {kind} model, which has no conversion")
    if kind == "segmenter" and (img_size is not None or args.dest == "timm"):
        raise ValueError("a segmenter converts to hf (BeitForSemanticSegmentation) or beitv2 only, at its own size")
    if img_size is not None:
        if kind == "vqkd":
            raise ConfigError("model.img_size: not supported for VQ-KD tokenizers")
        model = resize_model(model, img_size)
    return model


def _recorded(args: argparse.Namespace) -> dict[str, str]:
    """What a beitv2 model file records besides the weights (class names, normalisation); {} for other inputs."""
    if args.source != "beitv2":
        return {}
    return read_metadata(args.input)


def _preprocessing(args: argparse.Namespace, model, meta: dict):
    """The evaluation preprocessing the exports record: the file's normalisation and its run folder's config."""
    run = read_run_config(args.input) if args.source == "beitv2" else {}
    return preprocessing_of(model, meta.get("normalize"), run)


def resolved_options(args: argparse.Namespace) -> dict:
    """What ``--print-config`` prints: every option, as the command will use it."""
    img = _img_size(args)
    return {"from": args.source, "to": args.dest, "input": str(args.input), "output": str(args.output),
            "target": args.target, "rel_pos": args.rel_pos,
            "model": {"img_size": list(img) if isinstance(img, tuple) else img, "num_classes": args.num_classes,
                      "num_heads": args.num_heads, "decoder_num_heads": args.decoder_num_heads,
                      "early_layers": args.early_layers, "preset": args.preset},
            "decoder": None if args.decoder is None else str(args.decoder)}


def kind_name(model) -> str:
    return type(model).__name__.lower()


def run(args: argparse.Namespace) -> int:
    maybe_print_config(resolved_options(args), args)
    if not (args.input.exists() or str(args.input).startswith("hf-hub:")):
        raise ConfigError(f"input: not found: {args.input}")
    # before the model is read and converted: a file for beitv2, a folder for the others
    check_output_dir(args.output.expanduser().parent if args.dest == "beitv2" else args.output, "output")
    try:
        with reading("input"):
            model = load_input(args)
            meta = _recorded(args)
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
        if names is not None and len(names) != getattr(getattr(model, "config", None), "num_classes", -1):
            names = None  # recorded for another head (e.g. the backbone of a resized model)
        if args.dest == "beitv2":
            out = save_model(args.output, model, extra={"converted_from": f"{args.source}:{args.input.name}",
                                                        **{k: meta[k] for k in ("class_names", "normalize")
                                                           if k in meta}})
        elif args.dest == "hub":
            out = save_for_hub(model, args.output, {k: meta[k] for k in ("class_names", "normalize") if k in meta})
        elif kind_name(model) == "segmenter":
            out = export_hf_segmentation(model, args.output, **recorded_export_options(meta))
        elif args.dest == "timm":
            out = export_timm(model, args.output, rel_pos=args.rel_pos or "per_layer", class_names=names,
                              preprocessing=_preprocessing(args, model, meta))
        else:
            out = export_hf(model, args.output, rel_pos="per_layer" if args.rel_pos == "per_layer" else "keep",
                            class_names=names, preprocessing=_preprocessing(args, model, meta))
    except ConfigError:
        raise
    except (CheckpointMismatchError, ValueError, FileNotFoundError, KeyError, TypeError, pickle.UnpicklingError) as e:
        print(f"beitv2 convert: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({type(model).__name__}, {args.source} -> {args.dest})")
    return 0
