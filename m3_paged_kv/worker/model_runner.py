"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

Introduced in M0; M1 adds the KV cache and sampling; M2 runs a batch of sequences per
forward pass; M3 pages the KV cache. The cache is allocated once, at start: per layer a
(K, V) pair of shape [num_blocks, block_size, kv_heads, head_dim]. `num_blocks` fills a
memory budget: `kv_cache_memory` bytes if given, else on CUDA what
`gpu_memory_utilization` of the card leaves after the weights and a profiling forward
pass, and 1 GiB on the CPU. A sequence holds only the blocks its tokens fill (the
scheduler hands them out); the runner turns its blocks into a slot mapping (where each
new token's K/V is written) and, for a decode, into the slots of its whole context (what
attention reads). A prefill runs the prompts of several sequences, concatenated into
one flat batch of tokens; a decode runs one token of every running sequence. Either way
the model returns one row of logits per sequence and the sampler picks one token each.
"""

import torch

from ..attention.layer import AttentionMetadata
from ..config import EngineConfig
from ..core.block_pool import KVBlock
from ..core.kv_cache_manager import cdiv, slot_mapping
from ..model_executor.layers.sampler import Sampler, SamplingRow
from ..model_executor.model_loader import load_model, load_model_config
from ..request import Sequence
from ..sampling_params import SamplingParams

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
        self.block_size = config.block_size
        self.num_kv_blocks = self._count_kv_blocks()
        self.kv_caches = self.allocate_kv_cache(self.num_kv_blocks)

    def _count_kv_blocks(self) -> int:
        """As many blocks as the memory budget holds."""
        cache = self.config.cache_config
        block_bytes = self.kv_cache_bytes_per_token() * cache.block_size
        if cache.kv_cache_memory is not None:
            budget, name = cache.kv_cache_memory, "kv_cache_memory"
        elif self.device.type == "cuda":
            budget, name = self._profile_free_memory(), "gpu_memory_utilization"
        else:
            budget, name = DEFAULT_CPU_KV_CACHE_MEMORY, "kv_cache_memory"
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"{name}: leaves {budget} bytes for the KV cache, less than one block of "
                f"{cache.block_size} tokens ({block_bytes} bytes); give the cache more memory")
        return num_blocks

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Bytes for the KV cache on CUDA: gpu_memory_utilization of the card, less what is
        in use now (weights, other processes) and the peak of the largest step: a prefill
        of max_num_batched_tokens tokens (or of one max_model_len prompt), and a sampler
        over max_batch_size rows of logits."""
        cfg = self.config
        num_tokens = max(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
        lengths = [min(cfg.max_model_len - 1, num_tokens - i)
                   for i in range(0, num_tokens, cfg.max_model_len - 1)]
        blocks_per_seq = cdiv(cfg.max_model_len, self.block_size)
        self.kv_caches = self.allocate_kv_cache(blocks_per_seq * len(lengths))
        seqs = []
        for i, n in enumerate(lengths):
            seq = Sequence(-1 - i, "profile", [0] * n)
            seq.kv_blocks = [KVBlock(b) for b in range(i * blocks_per_seq,
                                                       (i + 1) * blocks_per_seq)]
            seqs.append(seq)
        torch.cuda.synchronize(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.forward(seqs, is_prefill=True)
        hidden = torch.zeros(cfg.max_batch_size, self.model_config.hidden_size,
                             dtype=self.dtype, device=self.device)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01)
        rows = [SamplingRow(params, [0], [], None, []) for _ in range(cfg.max_batch_size)]
        self.sampler(self.model.compute_logits(hidden), rows)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self.kv_caches = None
        self.sampler.generator = None  # sampling starts from its seed, as without profiling
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * cfg.gpu_memory_utilization) - (total - free) - peak

    def allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) pair per layer, [num_blocks, block_size, kv_heads, head_dim] each.

        Left uninitialized: attention reads only slots a sequence has written."""
        mc = self.model_config
        shape = (num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
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
        device, size = self.device, self.block_size
        if is_prefill:  # every token of every prompt (for nothing is cached yet)
            token_ids = [t for seq in seqs for t in seq.token_ids]
            positions = [p for seq in seqs for p in range(len(seq.token_ids))]
            slots = [s for seq in seqs
                     for s in slot_mapping(seq.kv_blocks, size, 0, len(seq.token_ids))]
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
            slots = [s for seq, p in zip(seqs, positions)
                     for s in slot_mapping(seq.kv_blocks, size, p, p + 1)]
            max_len = max(positions) + 1
            max_blocks = cdiv(max_len, size)
            block_tables = torch.tensor(  # padded with block 0 to the longest
                [[b.block_id for b in seq.kv_blocks[:max_blocks]]
                 + [0] * (max_blocks - min(max_blocks, len(seq.kv_blocks))) for seq in seqs],
                device=device)
            positions_t = torch.tensor(positions, device=device).unsqueeze(1)
            context = torch.arange(max_len, device=device)
            context_mask = context <= positions_t
            # Past its end a sequence reads its last key again (masked out): never memory
            # it has not written. Position p is at offset p % size of block p // size.
            context_positions = torch.minimum(context, positions_t)
            context_slots = (block_tables.gather(1, context_positions // size) * size
                             + context_positions % size)
            metadata = AttentionMetadata(
                False, torch.tensor(slots, device=device), positions_t.squeeze(1),
                list(range(len(seqs) + 1)), max_len,
                context_mask.view(len(seqs), 1, 1, max_len), block_tables, context_slots)
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
