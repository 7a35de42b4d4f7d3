"""Engine configuration: what the user asks for, and what the model is.

`EngineConfig` holds the user's settings (the same names in every stage that has them)
and checks them: a bad value raises `ValueError` naming the field. `ModelConfig` is the
model's architecture from its `config.json`; `EngineConfig.resolve` fills in what
depends on it, once, in a copy. Besides the model, they cover: batching limits and the
token budget; the KV cache's budget and blocks; the attention backend, CUDA graphs and
async scheduling; chunked prefill; prefix caching; quantization.

Introduced in M0; changed in M2 (batching limits, a KV budget), M3 (blocks), M4
(attention backend, CUDA graphs, async scheduling), M5 (chunked prefill, a smaller
budget), M6 (prefix caching), M7 (quantization).
"""

import dataclasses
from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
# auto: flash (the Triton kernels) on CUDA, torch (M3's reference) on the CPU (M4)
ATTENTION_BACKENDS = ("auto", "flash", "torch")
QUANTIZATION_METHODS = (None, "gptq")  # M7


def is_int(value) -> bool:
    """An integer, and not a bool (in Python True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _refuse_unsupported(hf: dict, model_type: str) -> None:
    """Refuse a `config.json` setting that changes transformers' computation and that the
    model code does not implement, instead of silently computing something else."""
    act = hf.get("hidden_act", "silu")
    _require(act in ("silu", "swish"), "hidden_act",
             f"{act!r} is not supported; this engine runs SiLU (SwiGLU) MLPs")
    if model_type == "llama":  # transformers' Llama has no sliding-window attention
        return
    # Qwen2/Qwen3 (as transformers reads them): `use_sliding_window` turns the window on for
    # the layers `layer_types` marks, by default those from `max_window_layers` on.
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
        else "full_attention" for i in range(hf["num_hidden_layers"])]
    sliding = sum(t != "full_attention" for t in layer_types)
    # A window no shorter than the longest sequence changes nothing.
    _require(sliding == 0 or (window or 0) >= hf.get("max_position_embeddings", 2048),
             "use_sliding_window", f"sliding-window attention (sliding_window={window} on "
             f"{sliding} of {len(layer_types)} layers) is not supported; this engine "
             "attends to the whole context")


@dataclass
class ModelConfig:
    """The architecture of a Llama-family model (Llama, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 always)
    o_proj_bias: bool = False  # bias on o_proj (Llama, Qwen3 with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # M7: a quantized checkpoint's settings (config.json's `quantization_config`, or its
    # `quantize_config.json`); None for a model in full precision
    quantization_config: dict | None = None

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict (transformers 4.x or 5.x layout).

        A setting that changes transformers' output is either read or refused (ValueError
        naming it), never ignored.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3"):
            raise ValueError(
                f"model_type: {model_type!r} is not supported; this engine runs the "
                "Llama family (llama, qwen2, qwen3)"
            )
        _refuse_unsupported(hf, model_type)
        # transformers: Llama and Qwen3 put `attention_bias` on q/k/v/o; Qwen2 always has a
        # q/k/v bias and no o bias; only Llama reads `mlp_bias`.
        bias = bool(hf.get("attention_bias", False))
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            architecture=(hf.get("architectures") or ["LlamaForCausalLM"])[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type not in ("default", None) else None,
            attention_bias=model_type == "qwen2" or bias,
            o_proj_bias=model_type != "qwen2" and bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            quantization_config=hf.get("quantization_config"),
        )

    def num_parameters(self) -> int:
        """Parameter count implied by the shapes (embeddings counted once if tied)."""
        h, q, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        d = self.head_dim
        attn = h * q * d + 2 * h * kv * d + q * d * h
        if self.attention_bias:
            attn += q * d + 2 * kv * d
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h


@dataclass
class EngineConfig:
    """What the user asks for. Seed names; later stages add fields, none rename."""

    model: str = "default"
    max_model_len: int | None = None  # None: the model's own limit, capped at 4096
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0
    max_batch_size: int = 256  # sequences per step (M2)
    # Tokens per step (M2: prompt tokens per prefill step). M5: every step's, decodes and
    # prompt chunks together; 2048 keeps a step short enough for the running sequences.
    max_num_batched_tokens: int = 2048
    # Bytes for the KV cache (M2). None: on CUDA what gpu_memory_utilization leaves after
    # the weights and a profiling forward pass (M3), on the CPU 1 GiB.
    kv_cache_memory: int | None = None
    block_size: int = 16  # tokens per KV cache block (M3)
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory to use (M3)
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS (M4)
    enforce_eager: bool = False  # True: no CUDA graphs, every step launched op by op (M4)
    # Schedule the next step while this one runs (M4); off until measured on a GPU.
    async_scheduling: bool = False
    # True: prompts are cut into chunks that share steps with decodes (M5); False: M4's
    # scheduler, whole prompts in steps of their own.
    enable_chunked_prefill: bool = True
    max_chunk_size: int | None = None  # the most tokens of one prompt in a step (M5)
    # True: a request starts after the part of its prompt whose K/V are cached (M6)
    enable_prefix_caching: bool = True
    # The linear layers' weights (M7): None = as the checkpoint stores them; "gptq" = GPTQ
    # (found in a quantized checkpoint's config by itself; a dummy model gets its random
    # weights rounded to 4 bits, groups of 64)
    quantization: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model != "", "model",
                 "give 'default', 'dummy:NAME' or the path of a local HF folder")
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.device in _DEVICES, "device",
                 f"must be one of {_DEVICES}, got {self.device!r}")
        if self.max_model_len is not None:
            _require(is_int(self.max_model_len) and self.max_model_len >= 2,
                     "max_model_len", f"must be an integer >= 2, got {self.max_model_len!r}")
        _require(is_int(self.seed) and 0 <= self.seed < 2**64, "seed",
                 f"must be an integer in [0, 2**64), got {self.seed!r}")
        _require(is_int(self.max_batch_size) and self.max_batch_size >= 1,
                 "max_batch_size", f"must be an integer >= 1, got {self.max_batch_size!r}")
        _require(is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens",
                 f"must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        if self.kv_cache_memory is not None:
            _require(is_int(self.kv_cache_memory) and self.kv_cache_memory >= 1,
                     "kv_cache_memory",
                     f"must be None or a number of bytes >= 1, got {self.kv_cache_memory!r}")
        _require(is_int(self.block_size) and self.block_size >= 1
                 and self.block_size & (self.block_size - 1) == 0, "block_size",
                 f"must be a power of two (1, 2, 4, 8, 16, ...), got {self.block_size!r}")
        _require(isinstance(self.gpu_memory_utilization, (int, float))
                 and 0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                 f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _require(isinstance(self.enforce_eager, bool), "enforce_eager",
                 f"must be True or False, got {self.enforce_eager!r}")
        _require(isinstance(self.async_scheduling, bool), "async_scheduling",
                 f"must be True or False, got {self.async_scheduling!r}")
        _require(isinstance(self.enable_chunked_prefill, bool), "enable_chunked_prefill",
                 f"must be True or False, got {self.enable_chunked_prefill!r}")
        if self.max_chunk_size is not None:
            _require(is_int(self.max_chunk_size) and self.max_chunk_size >= 1,
                     "max_chunk_size",
                     f"must be None or an integer >= 1, got {self.max_chunk_size!r}")
            _require(self.enable_chunked_prefill, "max_chunk_size",
                     "cuts prompts into chunks, which needs enable_chunked_prefill=True")
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                 f"must be True or False, got {self.enable_prefix_caching!r}")
        _require(self.quantization in QUANTIZATION_METHODS, "quantization",
                 f"must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step holds (once resolved): with chunked prefill, the
        budget; without, a longer prompt alone, or one token per running sequence."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens
        return max(self.max_num_batched_tokens, self.max_model_len, self.max_batch_size)

    @property
    def max_graph_tokens(self) -> int:
        """The largest step worth a CUDA graph: any step but a prompt longer than the
        budget, alone (its kernels are long enough that launching them costs little)."""
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens
        return max(self.max_num_batched_tokens, self.max_batch_size)

    def resolve(self, model_config: ModelConfig) -> "EngineConfig":
        """A copy with the values that depend on the model filled in and checked."""
        limit = model_config.max_position_embeddings
        max_model_len = min(limit, 4096) if self.max_model_len is None else self.max_model_len
        _require(max_model_len <= limit, "max_model_len",
                 f"{max_model_len} exceeds the model's max_position_embeddings ({limit})")
        return dataclasses.replace(self, max_model_len=max_model_len,
                                   quantization=self._resolve_quantization(model_config))

    def _resolve_quantization(self, model_config: ModelConfig) -> str | None:
        """A quantized checkpoint says so itself; asking for GPTQ needs GPTQ weights (or a
        dummy model, whose random weights get rounded)."""
        if model_config.quantization_config is not None:
            return "gptq"
        _require(self.quantization is None or self.model.startswith("dummy:"),
                 "quantization", f"{self.model!r} is not a GPTQ checkpoint (no "
                 "quantization_config in its config.json, no quantize_config.json); make one "
                 f"with `python -m {__package__}.quantize --model {self.model} --out DIR` "
                 "and load DIR")
        return self.quantization
