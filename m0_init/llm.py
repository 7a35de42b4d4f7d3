"""LLM: the user-facing entry point.

Introduced in M0, where it can load a model and run one forward pass: the next-token
distribution for a prompt. M1 adds `generate` and `chat`.
"""

import torch

from .config import EngineConfig, is_int
from .model_executor.model_loader import load_model_config, resolve_model_path
from .tokenizer import get_tokenizer
from .worker.model_runner import ModelRunner


class LLM:
    def __init__(self, model: str = "default", config: EngineConfig | None = None,
                 **kwargs) -> None:
        """`LLM("default")`, `LLM("dummy:qwen3-0.6b", device="cuda")`, or a config."""
        if config is not None and kwargs:
            raise ValueError(f"config: give an EngineConfig or keyword settings, not both "
                             f"(got {sorted(kwargs)})")
        config = config if config is not None else EngineConfig(model=model, **kwargs)
        model_config = load_model_config(config.model)
        self.config = config.resolve(model_config)  # a copy: max_model_len filled in
        self.model_runner = ModelRunner(self.config, model_config)
        eos = model_config.eos_token_ids[0] if model_config.eos_token_ids else None
        self.tokenizer = get_tokenizer(resolve_model_path(self.config.model),
                                       model_config.vocab_size, eos)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids for a text prompt (or checked ids); rejects empty or too-long prompts."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: is empty")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # e.g. a lone surrogate
                raise ValueError(f"prompt: is not valid text ({exc.reason} at index "
                                 f"{exc.start})") from None
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            token_ids = list(prompt)
            vocab = self.model_runner.model_config.vocab_size
            if not all(is_int(t) and 0 <= t < vocab for t in token_ids):
                raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        else:
            raise TypeError(f"prompt: must be a str or a list of token ids (ints), "
                            f"got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: has no tokens")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens is longer than "
                             f"max_model_len={self.config.max_model_len}")
        return token_ids

    def next_token_distribution(self, prompt: str | list[int],
                                top_k: int = 10) -> list[tuple[int, str, float]]:
        """The `top_k` most likely next tokens: (token id, text, probability)."""
        logits = self.model_runner.forward(self.encode(prompt))[-1]
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, top_k)
        return [(int(i), self.tokenizer.decode([int(i)], skip_special_tokens=False), float(p))
                for p, i in zip(top.values, top.indices)]
