"""Engine configuration: what the user asks for, and what the model is.

Introduced in M0. `EngineConfig` is the user-facing, flat set of knobs (the names stay
the same in every stage); `ModelConfig` is the model's architecture read from its
`config.json`; `CacheConfig` and `SchedulerConfig` group the knobs of the KV cache and
of the scheduler, which later stages grow. Every value is checked here, and a bad one
raises `ValueError` naming the field. M2 adds the batching limits (`max_batch_size`,
`max_num_batched_tokens`) and the KV cache's memory budget (`kv_cache_memory`).
"""

from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


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
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3"):
            raise ValueError(
                f"model_type: {model_type!r} is not supported; this engine runs the "
                "Llama family (llama, qwen2, qwen3)"
            )
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
            attention_bias=hf.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def num_parameters(self) -> int:
        """Parameter count implied by the shapes (embeddings counted once if tied)."""
        h, q, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        d = self.head_dim
        attn = h * q * d + 2 * h * kv * d + q * d * h
        if self.attention_bias:
            attn += q * d + 2 * kv * d
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h


@dataclass
class CacheConfig:
    """The KV cache. M0 has none; M1 keeps one contiguous cache per request; M2 keeps
    one preallocated slot of `max_model_len` tokens per running sequence."""

    max_model_len: int
    max_batch_size: int = 1  # M2: the most slots the cache needs
    kv_cache_memory: int | None = None  # M2: bytes for the cache; None: see EngineConfig


@dataclass
class SchedulerConfig:
    """How requests are scheduled. M2: many requests per step, within these limits."""

    max_model_len: int
    max_batch_size: int = 1
    max_num_batched_tokens: int = 8192  # M2: prompt tokens per prefill step


@dataclass
class EngineConfig:
    """What the user asks for. Seed names; later stages add fields, none rename."""

    model: str = "default"
    max_model_len: int | None = None  # None: the model's own limit, capped at 4096
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0
    max_batch_size: int = 256  # sequences per step (M2)
    max_num_batched_tokens: int = 8192  # prompt tokens per prefill step (M2)
    # Bytes for the KV cache (M2). None: room for max_batch_size slots, but at most 90% of
    # the free GPU memory on CUDA, or 1 GiB on the CPU.
    kv_cache_memory: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model != "", "model",
                 "give 'default', 'dummy:NAME' or the path of a local HF folder")
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.device in _DEVICES, "device",
                 f"must be one of {_DEVICES}, got {self.device!r}")
        if self.max_model_len is not None:
            _require(isinstance(self.max_model_len, int) and self.max_model_len >= 2,
                     "max_model_len", f"must be an integer >= 2, got {self.max_model_len!r}")
        _require(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        _require(isinstance(self.max_batch_size, int) and self.max_batch_size >= 1,
                 "max_batch_size", f"must be an integer >= 1, got {self.max_batch_size!r}")
        _require(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens",
                 f"must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        if self.kv_cache_memory is not None:
            _require(isinstance(self.kv_cache_memory, int) and self.kv_cache_memory >= 1,
                     "kv_cache_memory",
                     f"must be None or a number of bytes >= 1, got {self.kv_cache_memory!r}")

    def resolve(self, model_config: ModelConfig) -> None:
        """Fill in the values that depend on the model, and check them against it."""
        limit = model_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = min(limit, 4096)
        _require(self.max_model_len <= limit, "max_model_len",
                 f"{self.max_model_len} exceeds the model's max_position_embeddings ({limit})")

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(max_model_len=self.max_model_len, max_batch_size=self.max_batch_size,
                           kv_cache_memory=self.kv_cache_memory)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_model_len=self.max_model_len,
                               max_batch_size=self.max_batch_size,
                               max_num_batched_tokens=self.max_num_batched_tokens)
