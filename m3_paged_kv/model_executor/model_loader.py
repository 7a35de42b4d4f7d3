"""Find a model's weights and build it: the default model, a local HF folder, or dummy.

There is no hub: `model` is "default" (SmolLM2-135M-Instruct, see `default_model.py`),
the path of a local Hugging Face folder (config.json, one or more `*.safetensors`,
tokenizer files), or "dummy:NAME" for real shapes with random weights drawn from a seed
(vLLM's `load_format="dummy"`). A checkpoint must match the model tensor for tensor: an
unknown name or a wrong shape is refused, not skipped.

Introduced in M0.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from .default_model import DefaultModelError, ensure_default_model
from .models.llama import LlamaForCausalLM

# Shapes from the models' public config.json files; weights are random.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
             max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False)
DUMMY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(_TINY, model_type="llama", rope_theta=10000.0),
    "tiny-qwen2": dict(_TINY, model_type="qwen2", rope_theta=1000000.0),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", head_dim=32, rope_theta=1000000.0,
                       attention_bias=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       attention_bias=False, bos_token_id=151643, eos_token_id=151645),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128009),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128009),
}
DUMMY_PREFIX = "dummy:"
# Checkpoint tensors we may skip: rotary buffers that older checkpoints saved (recomputed).
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


def is_dummy(model: str) -> bool:
    return model.startswith(DUMMY_PREFIX)


def resolve_model_path(model: str) -> Path | None:
    """The HF folder for `model`, or None for a dummy model. Raises ValueError if unknown."""
    if is_dummy(model):
        name = model[len(DUMMY_PREFIX):]
        if name not in DUMMY_CONFIGS:
            raise ValueError(f"model: unknown dummy model {name!r}; "
                             f"choose one of {', '.join(sorted(DUMMY_CONFIGS))}")
        return None
    if model == "default":
        return ensure_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {model!r} is not 'default', 'dummy:NAME' or a local "
                         "Hugging Face folder with a config.json (there is no model hub here)")
    return path


def load_model_config(model: str) -> ModelConfig:
    path = resolve_model_path(model)
    if path is None:
        return ModelConfig.from_hf_config(DUMMY_CONFIGS[model[len(DUMMY_PREFIX):]])
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model: cannot read {path / 'config.json'}: {exc}") from exc
    return ModelConfig.from_hf_config(hf_config)


def load_model(model: str, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and fill its weights."""
    with torch.device("meta"):
        net = LlamaForCausalLM(model_config)
    net = net.to(dtype).to_empty(device=device)
    if model_config.tie_word_embeddings:  # moving off `meta` unties the shared weight
        net.lm_head.weight = net.model.embed_tokens.weight
    path = resolve_model_path(model)
    if path is None:
        _fill_random(net, seed)
    else:
        _load_safetensors(net, path)
    return net.eval()


def _fill_random(net: nn.Module, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02), drawn on the CPU so devices agree."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in net.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def _load_safetensors(net: nn.Module, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {path}")
    params = dict(net.named_parameters())  # a tied lm_head.weight is not listed
    loaded, unexpected, wrong_shape, tied_head = set(), [], [], None
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_HARMLESS_SUFFIXES):
                        continue
                    if name not in params:
                        if name == "lm_head.weight":  # tied: checked against the embeddings
                            tied_head = f.get_tensor(name)
                        else:
                            unexpected.append(name)
                        continue
                    tensor, param = f.get_tensor(name), params[name]
                    if tensor.shape != param.shape:  # copy_ would broadcast some of them
                        wrong_shape.append(f"{name} {tuple(tensor.shape)} (expected "
                                           f"{tuple(param.shape)})")
                        continue
                    with torch.no_grad():
                        param.copy_(tensor)
                    loaded.add(name)
    except Exception as exc:  # a truncated or corrupt file
        hint = " (delete the folder to prepare it again)" if "folovllm" in str(path) else ""
        raise DefaultModelError(f"model: cannot read weights in {path}: {exc}{hint}") from exc
    if unexpected:
        raise ValueError(f"model: {path} has weights this model does not use (a config.json "
                         f"setting it does not read?): {_first_few(unexpected)}")
    if wrong_shape:
        raise ValueError(f"model: {path} has weights of the wrong shape for its config.json: "
                         f"{_first_few(wrong_shape)}")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model: {path} lacks weights for {_first_few(missing)}")
    embed = net.model.embed_tokens.weight
    if tied_head is not None and not torch.equal(tied_head.to(embed), embed):
        raise ValueError(f"model: {path} has an lm_head.weight unlike its embeddings but "
                         "config.json sets tie_word_embeddings (transformers unties them)")


def _first_few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
