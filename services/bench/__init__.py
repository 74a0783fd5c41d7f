"""``outrider bench``: Outrider against target-only decoding and transformers' assisted
generation, on the same models and prompts, in one process and one run."""
