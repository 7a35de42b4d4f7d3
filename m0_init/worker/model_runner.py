"""The model runner: puts the model on the device and runs forward passes.

One forward pass over a whole prompt, returning logits.

Introduced in M0.
"""

import torch

from ..config import EngineConfig, ModelConfig
from ..model_executor.model_loader import load_model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but torch sees no GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config, self.model_config = config, model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = load_model(config.model, model_config, self.dtype, self.device,
                                seed=config.seed)

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] (float32) for every position of one sequence."""
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden)
