"""M4 flash attention: Triton kernels over the paged KV cache, CUDA graphs keyed by tokens."""

from .config import EngineConfig
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
