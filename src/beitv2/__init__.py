"""beitv2: BEiT v2 (VQ-KD tokenizer + masked image modeling with patch aggregation) and BEiT v1, end to end."""

__version__ = "0.1.0"
