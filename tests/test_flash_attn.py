"""M4's engine-side pieces: the attention backend switch, the kept input batch (padded
by tokens and empty sequences), the sampler's kept parameters, the CUDA graph sizes by
tokens, `unified_attention` on a mixed, padded step (Triton's interpreter on the CPU;
compiled in bf16 on a GPU), and (on a GPU) CUDA graphs giving eager mode's tokens.

Introduced in M4, for every stage with the `flash_attn` feature. The kernels one by one
are tested against their references in tests/test_triton_kernels.py and
tests/test_fused_ops.py; HF parity with the flash backend is in tests/test_parity.py.
"""

import os
import weakref
from types import SimpleNamespace

import pytest
import torch

from conftest import load_stage, stages_with

STAGES = stages_with("flash_attn")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("stage", STAGES)
def test_an_unknown_attention_backend_is_refused_with_the_choices(stage):
    EngineConfig = load_stage(stage).EngineConfig
    with pytest.raises(ValueError, match=r"attention_backend.*'flash'.*'torch'.*'triton'"):
        EngineConfig(attention_backend="triton")
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


@pytest.mark.parametrize("stage", STAGES)
def test_the_cpu_default_is_the_torch_reference(stage):
    llm = load_stage(stage).LLM("dummy:tiny-llama", device="cpu")
    runner = llm.engine.model_runner
    assert runner.attention_backend == "torch" and runner.graphs is None
    backends = {type(m.backend).__name__ for m in runner.model.modules()
                if hasattr(m, "backend")}
    assert backends == {"TorchRefAttention"}


class Scheduled:
    """What the scheduler sends the worker for one sequence."""

    def __init__(self, seq_name, new_token_ids, num_computed_tokens, new_block_ids, is_new,
                 next_token_id=None):
        self.seq_name, self.new_token_ids = seq_name, new_token_ids
        self.num_computed_tokens, self.new_block_ids = num_computed_tokens, new_block_ids
        self.is_new = is_new
        self.new_sequence = None  # how to sample it, with its first step
        self.next_token_id = next_token_id  # new tokens that stop inside the prompt


def make_batch(stage, max_seqs=4, block_size=4):
    module = load_stage(f"{stage}.worker.input_batch")
    return module, module.InputBatch(max_seqs, 64, 8, block_size, torch.device("cpu"))


def prepare(batch, scheduled, params, pad_to=None):
    """One step through the kept batch, as the model runner drives it: a sequence that
    starts brings how to sample it (its parameters), then the step's inputs are made."""
    for s, p in zip(scheduled, params):
        if s.is_new:
            s.new_sequence = SimpleNamespace(sampling_params=p, seed=None,
                                             prompt_token_ids=list(s.new_token_ids),
                                             blocked_token_ids=[])
    batch.update(SimpleNamespace(scheduled=scheduled, finished_seq_names=[],
                                 preempted_seq_names=[]))
    return batch.prepare(scheduled, pad_to=pad_to)


@pytest.mark.parametrize("stage", STAGES)
def test_the_input_batch_keeps_block_tables_and_appends_new_blocks(stage):
    module, batch = make_batch(stage)
    Params = load_stage(stage).SamplingParams
    params = [Params(temperature=0), Params(temperature=0.5, top_k=3)]
    # step 1: two prompts (5 and 3 tokens) start with their whole tables
    inputs = prepare(batch, [Scheduled("a", [1, 2, 3, 4, 5], 0, [7, 2], True),
                            Scheduled("b", [6, 7, 8], 0, [5], True)], params)
    md = inputs.attn_metadata
    assert inputs.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert md.slot_mapping.tolist() == [28, 29, 30, 31, 8, 20, 21, 22]
    assert md.query_start_loc.tolist() == [0, 5, 8] and md.seq_lens.tolist() == [5, 3]
    assert inputs.logits_indices.tolist() == [4, 7]
    assert md.max_query_len == 5 and md.max_seq_len == 5
    # step 2: decodes; "b" fills its block, neither gets a new one
    inputs = prepare(batch, [Scheduled("a", [9], 5, [], False),
                            Scheduled("b", [10], 3, [], False)], params)
    md = inputs.attn_metadata
    assert md.slot_mapping.tolist() == [9, 23] and inputs.positions.tolist() == [5, 3]
    assert md.block_tables[:, :2].tolist() == [[7, 2], [5, 0]]
    # step 3: "b" alone gets a block for its 5th token
    inputs = prepare(batch, [Scheduled("b", [11], 4, [1], False)], params[1:])
    assert inputs.attn_metadata.slot_mapping.tolist() == [4]  # block 1, offset 0
    assert inputs.attn_metadata.block_tables[0, :2].tolist() == [5, 1]
    # the sampling parameters were kept per sequence when it started
    tensors = batch.sampling_tensors()
    assert not tensors.all_greedy and tensors.top_k.tolist() == [3]
    assert tensors.temperature.tolist() == [0.5] and tensors.is_greedy.tolist() == [False]


@pytest.mark.parametrize("stage", STAGES)
def test_freed_sequences_give_back_their_rows_and_restart_clean(stage):
    module, batch = make_batch(stage, max_seqs=2)
    Params = load_stage(stage).SamplingParams
    prepare(batch, [Scheduled("a", [1, 2], 0, [3], True), Scheduled("b", [1], 0, [4], True)],
                  [Params()] * 2)
    batch.forget(["a", "unknown"])  # finished (an id it never saw is ignored)
    assert "a" not in batch.rows and len(batch.free_rows) == 1
    # a new sequence takes the free row; a recomputed one (is_new) gets a fresh table
    inputs = prepare(batch, [Scheduled("c", [5, 6], 0, [6], True),
                            Scheduled("b", [1, 9], 0, [2], True)], [Params()] * 2)
    assert inputs.attn_metadata.slot_mapping.tolist() == [24, 25, 8, 9]
    assert sorted(batch.rows) == ["b", "c"] and not batch.free_rows


@pytest.mark.parametrize("stage", STAGES)
def test_kept_sampling_parameters_match_parameters_built_per_step(stage):
    module, batch = make_batch(stage)
    mod = load_stage(stage)
    sampler = load_stage(f"{stage}.model_executor.layers.sampler")
    params = [mod.SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m)
              for t, p, k, m in [(0.0, 1.0, -1, 0.0), (0.7, 0.9, 5, 0.05), (1.3, 0.5, 0, 0.0)]]
    prepare(batch, [Scheduled(str(i), [1], 0, [i], True) for i in range(3)], params)
    kept, built = batch.sampling_tensors(), sampler.SamplingTensors.from_params(params, "cpu")
    for name in ("temperature", "top_k", "top_p", "min_p", "is_greedy"):
        assert torch.equal(getattr(kept, name), getattr(built, name)), name
    assert kept.all_greedy is built.all_greedy is False
    prepare(batch, [Scheduled("0", [2], 1, [], False)], params[:1])
    assert batch.sampling_tensors().all_greedy


# --- a padded step, graph sizes ---------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_a_padded_step_of_a_decode_and_part_of_a_prompt(stage):
    """A decode and the rest of a prompt padded to 8 tokens and 4 sequences: padding
    tokens are written nowhere and belong to no sequence; padding sequences are empty.
    (M4's scheduler sends whole prompts; the worker takes any part of one.)"""
    _, batch = make_batch(stage, max_seqs=4, block_size=4)
    Params = load_stage(stage).SamplingParams
    params = [Params(temperature=0), Params(temperature=0.5, top_k=3)]
    # step 1: a's whole prompt (3 tokens, block 1), b's first 5 tokens (blocks 2, 3)
    prepare(batch, [Scheduled("a", [1, 2, 3], 0, [1], True),
                   Scheduled("b", [10, 11, 12, 13, 14], 0, [2, 3], True)], params)
    # step 2: a decodes (position 3), b's last 2 tokens (positions 5 and 6, in block 3)
    inputs = prepare(batch, [Scheduled("a", [4], 3, [], False),
                            Scheduled("b", [15, 16], 5, [], False)], params, pad_to=(8, 4))
    md = inputs.attn_metadata
    assert inputs.input_ids.tolist() == [4, 15, 16, 0, 0, 0, 0, 0]
    assert inputs.positions.tolist() == [3, 5, 6, 0, 0, 0, 0, 0]
    assert md.slot_mapping.tolist() == [1 * 4 + 3, 3 * 4 + 1, 3 * 4 + 2] + [-1] * 5
    assert md.query_start_loc.tolist() == [0, 1, 3, 3, 3]
    assert md.seq_lens.tolist() == [4, 7, 0, 0]
    assert md.block_tables.shape[0] == 4 and md.block_tables[:2, :2].tolist() == [[1, 0],
                                                                                 [2, 3]]
    assert inputs.logits_indices.tolist() == [0, 2]  # the real sequences' last tokens only
    assert md.max_query_len == 2 and md.max_seq_len == 7
    assert batch.sampled == [0, 1]
    tensors = batch.sampling_tensors()
    assert not tensors.all_greedy and tensors.top_k.tolist() == [-1, 3]
    # New tokens that stop inside the prompt sample nothing: no logits row, no parameters.
    inputs = prepare(batch, [Scheduled("a", [4], 3, [], False),
                            Scheduled("b", [15, 16], 5, [], False, next_token_id=17)], params)
    assert batch.sampled == [0] and inputs.logits_indices.tolist() == [0]
    assert batch.sampling_tensors().all_greedy
    inputs = prepare(batch, [Scheduled("b", [15, 16], 5, [], False),
                            Scheduled("a", [4], 3, [], False, next_token_id=9)], params[::-1])
    assert batch.sampled == [0] and inputs.logits_indices.tolist() == [1]
    tensors = batch.sampling_tensors()
    assert tensors.top_k.tolist() == [3] and tensors.temperature.tolist() == [0.5]
    # Without padding the same step has just its own tokens and sequences.
    inputs = prepare(batch, [Scheduled("a", [5], 4, [4], False)], params[:1])
    assert inputs.input_ids.tolist() == [5]
    assert inputs.attn_metadata.slot_mapping.tolist() == [4 * 4]
    assert inputs.attn_metadata.query_start_loc.tolist() == [0, 1]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("budget,max_batch_size", [(1, 1), (100, 256), (256, 256),
                                                   (2048, 256), (2048, 100), (5000, 300),
                                                   (2048, 4000)])
def test_graph_sizes_by_tokens_hold_every_step(stage, budget, max_batch_size):
    cuda_graph = load_stage(f"{stage}.worker.cuda_graph")
    sizes = cuda_graph.graph_token_sizes(budget, max_batch_size)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] == min(budget, cuda_graph.LARGEST_GRAPH_TOKENS)
    for n in range(1, sizes[-1] + 1):  # every step size has a graph, the smallest that fits
        size = cuda_graph.padded_size(sizes, n)
        assert size in sizes and size >= n
        assert all(s < n for s in sizes if s < size)
    assert cuda_graph.padded_size(sizes, sizes[-1] + 1) is None  # larger: eager
    # Every step that can happen has its captured graph: decodes only (a sequence per
    # token, at most max_batch_size) and mixed steps (two tokens or more).
    keys = set(cuda_graph.StepGraphs(sizes, max_batch_size).keys)
    for n in range(1, sizes[-1] + 1):
        size = cuda_graph.padded_size(sizes, n)
        if n <= max_batch_size:
            assert (size, True) in keys, (n, size)
        if n >= 2:
            assert (size, False) in keys, (n, size)


# --- the kernels -------------------------------------------------------------------------

KERNEL_DEVICE = ("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                 else "cpu")


def mixed_batch(query_lens, cached_lens, heads, kv_heads, head_dim, block_size,
                pad_tokens, pad_seqs, dtype=torch.float32, q_scale=1.0, seed=0):
    """A paged cache (blocks shuffled in the pool) and the queries of a step of sequences
    with `query_lens` new tokens after `cached_lens` cached ones, padded as the worker
    pads: `pad_tokens` tokens of no sequence, `pad_seqs` empty sequences."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached_lens, query_lens)]
    blocks_needed = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens) + pad_seqs, max(blocks_needed), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = torch.tensor(order[used:used + n])
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    num_tokens = sum(query_lens)
    q = q_scale * torch.randn(num_tokens + pad_tokens, heads, head_dim, generator=g)
    starts = [0] + torch.tensor(query_lens).cumsum(0).tolist() + [num_tokens] * pad_seqs
    to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    return (to(q.to(dtype)), to(k_cache.to(dtype)), to(v_cache.to(dtype)),
            to(torch.tensor(starts, dtype=torch.int32)),
            to(torch.tensor(seq_lens + [0] * pad_seqs, dtype=torch.int32)), to(tables))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_unified_attention_on_a_mixed_padded_batch(stage, num_splits):
    """Decodes (one of a 1-token sequence, one over 301 keys), 6 new tokens after 70
    cached ones, 37 that span two query tiles, a fresh prompt; GQA 4/2, head_dim 24, block
    size 4; 3 padding tokens and 2 empty sequences. Only the real rows are compared."""
    ops = load_stage(f"{stage}.ops.paged_attention")
    query_lens = [1, 6, 7, 1, 37, 1]
    cached_lens = [9, 70, 0, 0, 5, 300]  # 300: three key tiles of 128 for the splits
    heads, head_dim = 4, 24
    inputs = mixed_batch(query_lens, cached_lens, heads, 2, head_dim, 4, pad_tokens=3,
                         pad_seqs=2)
    scale = head_dim ** -0.5
    got = ops.unified_attention(*inputs, scale, num_splits).cpu()
    want = ops.paged_attention_ref(*(t.cpu() for t in inputs), scale)
    real = sum(query_lens)
    assert got.shape == inputs[0].shape
    torch.testing.assert_close(got[:real], want[:real], atol=2e-4, rtol=2e-4)
    # Each kernel alone writes its own rows: the decodes' and the others'.
    rows = torch.repeat_interleave(torch.tensor(query_lens), torch.tensor(query_lens))
    decode_rows = rows == 1
    q = inputs[0]
    decoded = ops.paged_decode_attention(q, *inputs[1:], scale, num_splits,
                                         out=torch.zeros_like(q)).cpu()
    torch.testing.assert_close(decoded[:real][decode_rows], want[:real][decode_rows],
                               atol=2e-4, rtol=2e-4)
    assert torch.count_nonzero(decoded[:real][~decode_rows]) == 0
    varlen = ops.paged_attention(q, *inputs[1:], scale, out=torch.zeros_like(q)).cpu()
    torch.testing.assert_close(varlen[:real][~decode_rows], want[:real][~decode_rows],
                               atol=2e-4, rtol=2e-4)
    assert torch.count_nonzero(varlen[:real][decode_rows]) == 0
    # Padding is never written: neither kernel touches rows of no sequence.
    assert torch.count_nonzero(decoded[real:]) == torch.count_nonzero(varlen[real:]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="needs compiled Triton on CUDA")
@pytest.mark.parametrize("stage", STAGES)
def test_gpu_unified_attention_at_real_shapes(stage):
    """bf16, qwen3-0.6b's attention (16 heads, 8 kv heads, head_dim 128), block 16: a
    step of a few hundred tokens mixing decodes over long contexts with new tokens after
    thousands of cached ones, padded to 512 tokens and 16 sequences. Tolerance as in
    tests/test_triton_kernels.py (queries scaled up so the softmax is peaked)."""
    ops = load_stage(f"{stage}.ops.paged_attention")
    query_lens = [1, 200, 1, 64, 1, 37, 1, 100]
    cached_lens = [4096, 1000, 17, 0, 300, 2000, 15, 3000]
    real = sum(query_lens)
    inputs = mixed_batch(query_lens, cached_lens, 16, 8, 128, 16, pad_tokens=512 - real,
                         pad_seqs=8, dtype=torch.bfloat16, q_scale=4.0, seed=7)
    scale = 128 ** -0.5
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ops.decode_num_splits(16, 8, num_sms=num_sms)
    got = ops.unified_attention(*inputs, scale, splits)[:real].float().cpu()
    q, kc, vc, starts, seq_lens, tables = (t.cpu() for t in inputs)
    want = ops.paged_attention_ref(q.float(), kc.float(), vc.float(), starts, seq_lens,
                                   tables, scale)[:real]
    assert want.abs().amax() > 0.5, "the reference is too flat to catch a wrong key"
    err = (got - want).abs().max().item()
    assert err < 2e-2, f"max abs err {err:.3g}"


# --- on a GPU --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
def test_cuda_graph_replay_gives_the_tokens_of_eager_mode(stage, capsys):
    """Greedy tokens with steps replayed as CUDA graphs equal those of the same kernels
    launched eagerly: decode batches of 1, 5 (padded to 8) and 20 (padded to 32)."""
    mod = load_stage(stage)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 5000, (int(n),), generator=gen).tolist()
               for n in torch.randint(5, 300, (20,), generator=gen)]
    params = mod.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for eager in (False, True):
        llm = mod.LLM("dummy:qwen2.5-0.5b", device="cuda", enforce_eager=eager,
                      max_batch_size=32, kv_cache_memory=2**30)
        runner = llm.engine.model_runner
        assert (runner.graphs is None) == eager
        if not eager:
            assert {(1, True), (8, True), (32, True)} <= set(runner.graphs.graphs)
            assert runner.graphs.memory_bytes > 0
        tokens[eager] = [[o.token_ids for o in llm.generate(prompts[:n], params,
                                                            use_tqdm=False)]
                         for n in (1, 5, 20)]
        alive = weakref.ref(runner)
        del llm, runner
        # no reference cycle keeps the engine (and its KV cache and graphs) alive
        assert alive() is None
        torch.cuda.empty_cache()
    assert tokens[False] == tokens[True]
    assert "Capturing CUDA graphs" in capsys.readouterr().err


@pytest.mark.parametrize("stage", STAGES)
def test_rows_of_requests_aborted_between_steps_come_back(stage):
    """Freed requests reach the worker even when the step after them runs nothing."""
    mod = load_stage(stage)
    llm = mod.LLM("dummy:tiny-llama", device="cpu", max_batch_size=2)
    engine, batch = llm.engine, llm.engine.model_runner.input_batch
    params = mod.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for cycle in range(3):
        for i in range(2):
            engine.add_request(f"c{cycle}-{i}", [5, 6, 7], params)
        engine.step()
        assert len(batch.rows) == 2
        for i in range(2):
            engine.abort_request(f"c{cycle}-{i}")
        engine.step()  # nothing to run
    engine.add_request("last", [5, 6, 7], params)
    engine.step()  # the worker forgets the aborted ones first, then takes a row
    assert list(batch.rows) == ["last"] and len(batch.free_rows) == 1
