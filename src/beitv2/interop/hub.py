"""The Hugging Face hub: ``hf-hub:ORG/NAME[@REVISION]`` wherever a checkpoint path is taken, and model folders that
``huggingface_hub.upload_folder`` can publish as they are.

Downloads go through huggingface_hub (``hf_hub_download``), so its cache, ``HF_HOME``/``HF_HUB_CACHE``, tokens and
``HF_HUB_OFFLINE=1`` (cache only, no network) apply unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREFIX = "hf-hub:"
WEIGHTS_NAME = "model.safetensors"


def is_hub_ref(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).startswith(PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """'hf-hub:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); the revision is optional."""
    repo = str(ref)[len(PREFIX):]
    repo, _, rev = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{ref}: expected hf-hub:ORG/NAME[@REVISION]")
    return repo, rev or None


def hub_weights(ref: str, filename: str = WEIGHTS_NAME) -> Path:
    """The local path of ``filename`` of the hub repo ``ref`` (downloaded into, or read from, the HF cache)."""
    from huggingface_hub import hf_hub_download

    repo, rev = parse_hub_ref(ref)
    return Path(hf_hub_download(repo, filename, revision=rev))


def model_card(kind: str, config: dict, library: str, extra: str = "") -> str:
    """A README.md model card with the hub's YAML front matter."""
    tags = ["beitv2", "beit", "image-feature-extraction" if kind != "vqkd" else "image-tokenizer"]
    front = "\n".join(["---", f"library_name: {library}", "tags:", *[f"- {t}" for t in tags], "---"])
    return (f"{front}\n\n# beitv2 {kind} model\n\nExported by [beitv2](https://pypi.org/project/beitv2/) "
            f"(BEiT v2: VQ-KD tokenizer and masked image modeling with patch aggregation).\n\n{extra}"
            f"## Configuration\n\n```json\n{json.dumps(config, indent=2)}\n```\n")


def save_for_hub(model: Any, out_dir: str | Path, extra_meta: dict[str, str] | None = None) -> Path:
    """A folder to upload as is: our ``model.safetensors`` (weights + kind + config, what `load_model` reads, also
    as ``hf-hub:ORG/NAME``), ``config.json`` (kind and config) and a README.md model card."""
    from ..checkpoint import kind_of, save_model
    from ..config import to_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / WEIGHTS_NAME, model, extra=extra_meta)
    kind = kind_of(model).name
    cfg = to_dict(model.config)
    (out / "config.json").write_text(json.dumps({"library_name": "beitv2", "kind": kind, "config": cfg}, indent=2))
    usage = ("## Usage\n\n```python\nimport beitv2\n\nmodel = beitv2.load_model(\"hf-hub:ORG/NAME\")  # this repo\n"
             "```\n\n")
    (out / "README.md").write_text(model_card(kind, cfg, "beitv2", usage))
    return out
