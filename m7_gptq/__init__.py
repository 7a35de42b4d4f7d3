"""M7 GPTQ: the full engine, with 4-bit weights found by GPTQ and run by W4A16 kernels."""

from .config import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
