"""M1 basic: generation with a contiguous KV cache, a sampler and stop rules."""

from .config import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
