"""Quantization methods for the linear layers: GPTQ (`gptq.py`). Introduced in M7."""
