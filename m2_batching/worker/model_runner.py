"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

Introduced in M0; M1 adds the KV cache and sampling; M2 runs a batch of sequences per
forward pass. The KV cache is allocated once, at start: per layer a (K, V) pair of shape
[num_slots, max_model_len, kv_heads, head_dim], one slot for each sequence that may run
at once. A running sequence owns one whole slot, however few tokens it holds; that waste
is what M3's paged cache removes. A prefill runs the prompts of several sequences,
concatenated into one flat batch of tokens; a decode runs one token of every running
sequence. Either way the model returns one row of logits per sequence and the sampler
picks one token per sequence.
"""

import torch

from ..attention.layer import AttentionMetadata
from ..config import EngineConfig
from ..model_executor.layers.sampler import Sampler, SamplingRow
from ..model_executor.model_loader import load_model, load_model_config
from ..request import Sequence

DEFAULT_CPU_KV_CACHE_MEMORY = 2**30  # bytes, when kv_cache_memory is None on a CPU


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
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            # cuDNN's attention builds a plan for every new shape, and decode changes the
            # key length every step: planning then costs more than the attention itself.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model_config = load_model_config(config.model)
        config.resolve(self.model_config)
        self.model = load_model(config.model, self.model_config, self.dtype, self.device,
                                seed=config.seed)
        self.sampler = Sampler(seed=config.seed)
        self.num_kv_slots = self._count_kv_slots()
        self.kv_caches = self.allocate_kv_cache(self.num_kv_slots)

    def _count_kv_slots(self) -> int:
        """max_batch_size slots, or fewer if the memory budget cannot hold them."""
        cache = self.config.cache_config
        slot_bytes = self.kv_cache_bytes_per_token() * cache.max_model_len
        if cache.kv_cache_memory is not None:
            num_slots = min(cache.max_batch_size, cache.kv_cache_memory // slot_bytes)
            if num_slots < 1:
                raise ValueError(
                    f"kv_cache_memory: {cache.kv_cache_memory} bytes cannot hold one KV slot "
                    f"of max_model_len={cache.max_model_len} tokens ({slot_bytes} bytes); "
                    "raise kv_cache_memory or lower max_model_len")
            return num_slots
        if self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.9)
        else:
            budget = DEFAULT_CPU_KV_CACHE_MEMORY
        return max(1, min(cache.max_batch_size, budget // slot_bytes))

    def allocate_kv_cache(self, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) pair per layer, [num_slots, max_model_len, kv_heads, head_dim] each.

        Left uninitialized: attention reads only positions a sequence has written."""
        mc = self.model_config
        shape = (num_slots, self.config.max_model_len, mc.num_key_value_heads, mc.head_dim)
        return [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(mc.num_hidden_layers)
        ]

    def kv_cache_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        """The flat token batch and the attention metadata for one step."""
        device = self.device
        if is_prefill:  # every token of every prompt (for nothing is cached yet)
            token_ids = [t for seq in seqs for t in seq.token_ids]
            positions = [p for seq in seqs for p in range(len(seq.token_ids))]
            slots = [seq.kv_slot for seq in seqs for _ in seq.token_ids]
            query_start_loc = [0]
            for seq in seqs:
                query_start_loc.append(query_start_loc[-1] + len(seq.token_ids))
            last = torch.tensor(query_start_loc[1:], device=device) - 1
            metadata = AttentionMetadata(
                True, torch.tensor(slots, device=device),
                torch.tensor(positions, device=device), query_start_loc)
        else:  # the newest token of each sequence
            token_ids = [seq.token_ids[-1] for seq in seqs]
            positions = [len(seq.token_ids) - 1 for seq in seqs]
            max_len = max(positions) + 1
            positions_t = torch.tensor(positions, device=device).unsqueeze(1)
            context = torch.arange(max_len, device=device)
            context_mask = context <= positions_t
            # Past its end a sequence reads its last key again (masked out): never memory
            # it has not written.
            context_positions = torch.minimum(context, positions_t)
            metadata = AttentionMetadata(
                False, torch.tensor([seq.kv_slot for seq in seqs], device=device),
                positions_t.squeeze(1), list(range(len(seqs) + 1)), max_len,
                context_mask.view(len(seqs), 1, 1, max_len), context_positions)
            last = None
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        return input_ids, metadata.positions, metadata, last

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """One step for `seqs`: the logits of each sequence's last token, [B, vocab] float32."""
        input_ids, positions, attn_metadata, last = self._prepare(seqs, is_prefill)
        hidden = self.model(input_ids, positions, self.kv_caches, attn_metadata)
        if last is not None:
            hidden = hidden[last]  # only the last token of each prompt is sampled from
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute_model(self, seqs: list[Sequence], is_prefill: bool,
                      sampling_rows: list[SamplingRow]) -> list[int]:
        """Prefill or decode `seqs` in one forward pass, then sample one token for each."""
        logits = self.forward(seqs, is_prefill)
        for seq in seqs:
            seq.num_cached_tokens = len(seq.token_ids)
        return self.sampler(logits, sampling_rows).tolist()
