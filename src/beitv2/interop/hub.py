"""The Hugging Face hub: model folders that ``huggingface_hub.upload_folder`` can publish as they are, read back
wherever a checkpoint path is taken as ``hf-hub:ORG/NAME[@REVISION]`` (`beitv2.checkpoint.resolve_weights`, through
``hf_hub_download``, so its cache, ``HF_HOME``/``HF_HUB_CACHE``, tokens and ``HF_HUB_OFFLINE=1`` apply unchanged).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import WEIGHTS_NAME, is_hub_ref, kind_of, save_model
from ..config import to_dict

# references are parsed and downloaded where files are resolved (`beitv2.checkpoint.resolve_weights`); this module
# writes the folders published to the hub
__all__ = ["is_hub_ref", "model_card", "save_for_hub"]


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
