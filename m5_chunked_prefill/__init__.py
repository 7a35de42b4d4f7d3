"""M5 chunked prefill: one token budget per step, prompt chunks beside the decodes."""

from .config import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
