"""Figures and the Markdown report of a run (used by `beitv2 quickstart`, usable on their own).

Every function draws on a matplotlib `Figure` without pyplot (no display needed, the global backend untouched)
and writes its PNG atomically:

* `plot_training_curves` - losses, MIM accuracy, codebook usage/perplexity from ``metrics.jsonl`` files;
* `codebook_atlas` - image patches grouped by their VQ-KD code (the paper's "same code, same meaning" figure);
* `attention_figure` - the attention of one query patch over the image (the BEiT attention figure);
* `mask_examples` - draws of a mask generator, optionally over images;
* `write_report` - ``report.md`` with the accuracy table, timings, settings and the figures.
"""

from .atlas import codebook_atlas
from .attention import attention_figure
from .markdown import write_report
from .masks import mask_examples
from .plots import plot_training_curves, read_jsonl

__all__ = ["attention_figure", "codebook_atlas", "mask_examples", "plot_training_curves", "read_jsonl",
           "write_report"]
