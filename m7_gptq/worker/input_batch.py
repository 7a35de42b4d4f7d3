"""The step's inputs: the scheduler's plain ints turned into the model's flat batch.

Each scheduled sequence computes its new tokens at positions `[num_computed,
num_computed + n)` (a prompt, part of one, or last step's token: the same case), laid
one after the other into `T` tokens with their positions, cache slots, attention's view
and `logits_indices` (the last token of each sequence that samples). Kept from step to
step: per running sequence a block table row and its sampling row, and the last step's
sampled tokens on the device (a token the host does not know yet, a negative id, is
copied from them). Arrays are built with numpy in pinned buffers (two sets, in turn),
copied without waiting to device buffers of fixed address (what a CUDA graph reads).

Introduced in M2; changed in M4 (kept buffers and tables, padding by tokens).
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..attention.metadata import AttentionMetadata
from ..model_executor.layers.sampler import SamplingRow, SamplingTensors
from ..sampling_params import SamplingParams
from ..utils import cdiv


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] the last tokens of the sequences that sample


def slot_of(block_ids: list[int], block_size: int, position: int) -> int:
    """Where token `position` of a sequence holding blocks `block_ids` is in the cache."""
    return block_ids[position // block_size] * block_size + position % block_size


class StepBuffers:
    """One step's arrays at their largest, allocated once: pinned on the host (so the
    copy to the GPU need not wait), or on the device."""

    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int,
                 device: torch.device, pin_memory: bool = False) -> None:
        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device, pin_memory=pin_memory)
        self.input_ids = buffer(max_num_tokens)
        self.positions = buffer(max_num_tokens)
        self.slot_mapping = buffer(max_num_tokens)
        self.query_start_loc = buffer(max_num_seqs + 1)
        self.seq_lens = buffer(max_num_seqs)
        self.block_tables = buffer(max_num_seqs, max_blocks_per_seq)
        self.logits_indices = buffer(max_num_seqs)
        self.sampled_tokens = buffer(max_num_seqs)  # what they sampled, back on the host
        self.pending_index = buffer(max_num_seqs)  # where the tokens not yet known go
        self.pending_source = buffer(max_num_seqs)  # and which of the last step's each is
        self.sampling = torch.zeros(5, max_num_seqs, dtype=torch.float32, device=device,
                                    pin_memory=pin_memory)

    def names(self) -> list[str]:
        return list(vars(self))


def keep_history(row: SamplingRow, end: int) -> None:
    """A row's history holds its tokens before position `end`, where the step that
    samples its next token ends: a token sampled in a step whose results were then lost
    (an error after it ran; the step runs again) leaves it."""
    del row.output_token_ids[end - len(row.prompt_token_ids):]


# columns of the sampling parameter table, one row per running sequence
TEMPERATURE, TOP_K, TOP_P, MIN_P, GREEDY = range(5)


class InputBatch:
    """The worker's lasting view of the running sequences, and each step's inputs."""

    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device) -> None:
        self.block_size, self.device = block_size, device
        self.max_num_seqs, self.max_num_tokens = max_num_seqs, max_num_tokens
        # Per running sequence (a row each), kept from step to step.
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int64)
        self.sampling_table = np.zeros((max_num_seqs, 5), dtype=np.float32)
        self.rows: dict[str, int] = {}  # sequence name -> its row
        # How to sample each sequence (its generator, its token history), from its first
        # step until it finishes: a preempted one keeps its own.
        self.sampling_rows: dict[str, SamplingRow] = {}
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.step_rows = np.zeros(0, dtype=np.int64)  # the rows of the last step, in order
        self.sampled: list[int] = []  # which of the last step's sequences sample
        pin = device.type == "cuda"
        # Two sets of host buffers, one per step in turn: a step is built while the copies
        # of the one before may still be running.
        self.hosts = [StepBuffers(max_num_seqs, max_num_tokens, max_blocks_per_seq, "cpu",
                                  pin) for _ in range(2)]
        self.host, self.turn = self.hosts[0], 0  # the set the next step is built in
        self.gpu = StepBuffers(max_num_seqs, max_num_tokens, max_blocks_per_seq, device)
        # The last launched step's sampled tokens, on the device, and their rows.
        self.last_sampled: tuple[torch.Tensor, np.ndarray] | None = None

    # -- the lasting part ---------------------------------------------------------------
    def update(self, scheduler_output) -> None:
        """Forget the sequences that finished (their rows and how to sample them) and the
        tables of those preempted; keep how to sample those that start."""
        for name in scheduler_output.finished_seq_names:
            self.sampling_rows.pop(name, None)
        self.forget(scheduler_output.finished_seq_names + scheduler_output.preempted_seq_names)
        for s in scheduler_output.scheduled:
            if s.new_sequence is not None and s.seq_name not in self.sampling_rows:
                self.sampling_rows[s.seq_name] = self._new_sampling_row(s.new_sequence)
            if s.next_token_id is None:  # it samples: its history ends where its tokens do
                keep_history(self.sampling_rows[s.seq_name],
                             s.num_computed_tokens + len(s.new_token_ids))

    def _new_sampling_row(self, new) -> SamplingRow:
        """A row of its own: a private random stream when the request has a seed (so its
        samples do not depend on what runs beside it), and its token history."""
        generator = None if new.seed is None else \
            torch.Generator(self.device).manual_seed(new.seed)
        return SamplingRow(new.sampling_params, list(new.prompt_token_ids), [], generator,
                           list(new.blocked_token_ids))

    def forget(self, names: list[str]) -> None:
        """These sequences' blocks were freed: their rows go back."""
        for name in names:
            row = self.rows.pop(name, None)
            if row is not None:
                self.free_rows.append(row)

    def _update_row(self, scheduled) -> int:
        """The sequence's row, with its block table brought up to date."""
        row = self.rows.get(scheduled.seq_name)
        if scheduled.is_new:
            if row is None:
                row = self.rows[scheduled.seq_name] = self.free_rows.pop()
            params = self.sampling_rows[scheduled.seq_name].params
            self.sampling_table[row] = (params.temperature or 1.0, params.top_k,
                                        params.top_p, params.min_p, params.greedy)
        elif row is None:
            raise RuntimeError(f"sequence {scheduled.seq_name!r}: no block table kept for it "
                               "(its first step never reached the worker)")
        # The new blocks follow those that hold the tokens already computed (the same rule
        # as the scheduler's), so a step sent again after a failed one writes the same.
        start = 0 if scheduled.is_new else cdiv(scheduled.num_computed_tokens, self.block_size)
        new = scheduled.new_block_ids
        self.block_table[row, start:start + len(new)] = new
        return row

    # -- one step -------------------------------------------------------------------------
    def prepare(self, scheduled: list, pad_to: tuple[int, int] | None = None) -> ModelInputs:
        """The model's inputs for the scheduled sequences (duck-typed `ScheduledSequence`s:
        seq_name, new_token_ids, num_computed_tokens, new_block_ids, is_new,
        next_token_id). With `pad_to` = (tokens, sequences), the step grows to that size
        with padding."""
        rows = np.fromiter((self._update_row(s) for s in scheduled),
                           dtype=np.int64, count=len(scheduled))
        query_lens = np.fromiter((len(s.new_token_ids) for s in scheduled), dtype=np.int64,
                                 count=len(scheduled))
        computed = np.fromiter((s.num_computed_tokens for s in scheduled), dtype=np.int64,
                               count=len(scheduled))
        num_tokens = int(query_lens.sum())
        token_ids = np.fromiter(itertools.chain.from_iterable(s.new_token_ids for s in scheduled),
                                dtype=np.int64, count=num_tokens)
        self.step_rows = rows
        # New tokens that stop inside the prompt (next_token_id given) sample nothing.
        self.sampled = [i for i, s in enumerate(scheduled) if s.next_token_id is None]
        self.host = self.hosts[self.turn]
        return self._fill(rows, query_lens, computed, token_ids, pad_to)

    def _fill(self, rows: np.ndarray, query_lens: np.ndarray, computed: np.ndarray,
              token_ids: np.ndarray, pad_to: tuple[int, int] | None) -> ModelInputs:
        num_seqs, num_tokens = len(rows), len(token_ids)
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=starts[1:])
        seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(num_tokens) - starts[seq_of_token] + computed[seq_of_token]
        blocks = self.block_table[rows[seq_of_token], positions // self.block_size]
        seq_lens = computed + query_lens

        padded_tokens, padded_seqs = (num_tokens, num_seqs) if pad_to is None else pad_to
        h = {name: getattr(self.host, name).numpy() for name in self.host.names()}
        h["input_ids"][:num_tokens] = token_ids
        h["positions"][:num_tokens] = positions
        h["slot_mapping"][:num_tokens] = blocks * self.block_size + positions % self.block_size
        h["query_start_loc"][:num_seqs + 1] = starts
        h["seq_lens"][:num_seqs] = seq_lens
        h["block_tables"][:num_seqs] = self.block_table[rows]
        num_sampled = len(self.sampled)
        h["logits_indices"][:num_sampled] = starts[1:][self.sampled] - 1
        # padding: tokens at position 0 written nowhere and of no sequence; sequences
        # with no new token and no keys
        h["input_ids"][num_tokens:padded_tokens] = 0
        h["positions"][num_tokens:padded_tokens] = 0
        h["slot_mapping"][num_tokens:padded_tokens] = -1
        h["query_start_loc"][num_seqs + 1:padded_seqs + 1] = num_tokens
        h["seq_lens"][num_seqs:padded_seqs] = 0

        g = self.gpu
        # These host buffers are reused two steps later, once this step's tokens were
        # copied back (after these copies).
        for name, length in (("input_ids", padded_tokens), ("positions", padded_tokens),
                             ("slot_mapping", padded_tokens),
                             ("query_start_loc", padded_seqs + 1),
                             ("seq_lens", padded_seqs), ("block_tables", padded_seqs),
                             ("logits_indices", num_sampled)):
            getattr(g, name)[:length].copy_(getattr(self.host, name)[:length],
                                            non_blocking=True)
        pending = np.flatnonzero(token_ids < 0)
        if len(pending):
            self._fill_pending(pending, rows[seq_of_token[pending]])
        metadata = AttentionMetadata(
            query_start_loc=g.query_start_loc[:padded_seqs + 1],
            seq_lens=g.seq_lens[:padded_seqs], block_tables=g.block_tables[:padded_seqs],
            slot_mapping=g.slot_mapping[:padded_tokens],
            max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()))
        return ModelInputs(g.input_ids[:padded_tokens], g.positions[:padded_tokens], metadata,
                           g.logits_indices[:num_sampled])

    def _fill_pending(self, index: np.ndarray, rows: np.ndarray) -> None:
        """Tokens sampled by the step before, not yet known on the host (async
        scheduling): each is copied on the device from that step's sampled tokens."""
        if self.last_sampled is None:
            raise RuntimeError("pending tokens, but the step before sampled nothing")
        tokens, sampled_rows = self.last_sampled
        position = np.full(self.max_num_seqs, -1, dtype=np.int64)
        position[sampled_rows] = np.arange(len(sampled_rows))
        source = position[rows]
        if (source < 0).any():
            raise RuntimeError("a pending token of a sequence that did not sample in the "
                               "step before")
        n = len(index)
        self.host.pending_index.numpy()[:n] = index
        self.host.pending_source.numpy()[:n] = source
        g = self.gpu
        for name in ("pending_index", "pending_source"):
            getattr(g, name)[:n].copy_(getattr(self.host, name)[:n], non_blocking=True)
        g.input_ids[g.pending_index[:n]] = tokens[g.pending_source[:n]]

    def tokens_to_host(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step's sampled tokens copied back to the host without waiting: valid once
        the device gets there."""
        host = self.host.sampled_tokens[:len(tokens)]
        host.copy_(tokens, non_blocking=True)
        return host

    def commit_step(self, tokens: torch.Tensor | None) -> None:
        """The step was launched: the next one is built in the other set of host buffers,
        and takes its pending tokens from this one's sampled `tokens` (left on the device;
        None: it sampled nothing). A step that failed to launch is not committed."""
        self.last_sampled = None if tokens is None else (tokens, self.step_rows[self.sampled])
        self.turn = 1 - self.turn

    def step_sampling_rows(self, scheduled: list) -> list[SamplingRow]:
        """How to sample each scheduled sequence, in order."""
        return [self.sampling_rows[s.seq_name] for s in scheduled]

    @staticmethod
    def append_sampled(rows: list[SamplingRow], tokens: list[int]) -> None:
        """The sampled tokens join their rows' histories (for the penalties)."""
        for row, token in zip(rows, tokens):
            row.output_token_ids.append(token)

    def sampling_tensors(self) -> SamplingTensors:
        """The last step's sampling parameters, gathered from the kept table (of its
        sequences that sample)."""
        rows = self.step_rows[self.sampled]
        table = self.sampling_table[rows]  # [B, 5]
        num_seqs = len(rows)
        columns = self.gpu.sampling[:, :num_seqs]
        if table[:, GREEDY].all():  # one argmax: no parameter is read, none is copied
            return SamplingTensors(*columns, all_greedy=True)
        self.host.sampling.numpy()[:, :num_seqs] = table.T
        columns.copy_(self.host.sampling[:, :num_seqs], non_blocking=True)
        return SamplingTensors(columns[TEMPERATURE], columns[TOP_K].long(), columns[TOP_P],
                               columns[MIN_P], columns[GREEDY].bool(), all_greedy=False)


@dataclass
class _NewSequence:
    seq_name: str
    new_token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    is_new: bool = True
    next_token_id: int | None = None


def prepare_inputs(new_token_ids: list[list[int]], num_computed_tokens: list[int],
                   block_ids: list[list[int]], block_size: int,
                   device: torch.device) -> ModelInputs:
    """One flat batch from each sequence's new tokens, start position and block ids, in a
    batch of its own (for tests and for profiling a step)."""
    max_blocks = max(len(blocks) for blocks in block_ids)
    batch = InputBatch(len(new_token_ids), sum(len(ids) for ids in new_token_ids), max_blocks,
                       block_size, device)
    scheduled = [_NewSequence(str(i), ids, start, blocks) for i, (ids, start, blocks)
                 in enumerate(zip(new_token_ids, num_computed_tokens, block_ids))]
    for s in scheduled:
        batch.sampling_rows[s.seq_name] = SamplingRow(SamplingParams(), [], [], None, [])
    return batch.prepare(scheduled)
