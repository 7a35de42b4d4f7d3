"""Quantization methods for the linear layers (M7): GPTQ (`gptq.py`)."""
