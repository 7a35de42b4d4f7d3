"""M0 init: configs, sampling params, requests, model + tokenizer loading, one forward pass."""

from .config import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
