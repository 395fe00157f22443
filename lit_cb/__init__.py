"""lit_cb: compress LLMs to 2-3 bits/weight with learned codebooks, recover with LoRA, run fast."""

__version__ = "0.1.0"
