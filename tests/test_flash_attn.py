"""M4's engine-side pieces: the attention backend switch, the kept input batch, the
sampler's kept parameters, and (on a GPU) CUDA graphs giving eager mode's tokens.

Introduced in M4, for every stage with the `flash_attn` feature. The kernels themselves
are tested against their references in tests/test_triton_kernels.py and
tests/test_fused_ops.py; HF parity with the flash backend is in tests/test_parity.py.
"""

import weakref

import pytest
import torch

from conftest import load_stage, stages_with

STAGES = stages_with("flash_attn")
# M5 pads a step by tokens and captures graphs by tokens: tests/test_chunked_prefill.py.
DECODE_PADDING_STAGES = [s for s in STAGES if s not in stages_with("chunked_prefill")]


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

    def __init__(self, request_id, new_token_ids, num_computed_tokens, new_block_ids, is_new,
                 next_token_id=None):
        self.request_id, self.new_token_ids = request_id, new_token_ids
        self.num_computed_tokens, self.new_block_ids = num_computed_tokens, new_block_ids
        self.is_new = is_new
        self.next_token_id = next_token_id  # M5: a chunk inside its prompt (no token)


def make_batch(stage, max_seqs=4, block_size=4):
    module = load_stage(f"{stage}.worker.input_batch")
    return module, module.InputBatch(max_seqs, 64, 8, block_size, torch.device("cpu"))


@pytest.mark.parametrize("stage", STAGES)
def test_the_input_batch_keeps_block_tables_and_appends_new_blocks(stage):
    module, batch = make_batch(stage)
    Params = load_stage(stage).SamplingParams
    params = [Params(temperature=0), Params(temperature=0.5, top_k=3)]
    # step 1: two prompts (5 and 3 tokens) start with their whole tables
    inputs = batch.prepare([Scheduled("a", [1, 2, 3, 4, 5], 0, [7, 2], True),
                            Scheduled("b", [6, 7, 8], 0, [5], True)], params)
    md = inputs.attn_metadata
    assert inputs.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert md.slot_mapping.tolist() == [28, 29, 30, 31, 8, 20, 21, 22]
    assert md.query_start_loc.tolist() == [0, 5, 8] and md.seq_lens.tolist() == [5, 3]
    assert inputs.logits_indices.tolist() == [4, 7]
    assert md.max_query_len == 5 and md.max_seq_len == 5
    # step 2: decodes; "b" fills its block, neither gets a new one
    inputs = batch.prepare([Scheduled("a", [9], 5, [], False),
                            Scheduled("b", [10], 3, [], False)], params)
    md = inputs.attn_metadata
    assert md.slot_mapping.tolist() == [9, 23] and inputs.positions.tolist() == [5, 3]
    assert md.block_tables[:, :2].tolist() == [[7, 2], [5, 0]]
    # step 3: "b" alone gets a block for its 5th token
    inputs = batch.prepare([Scheduled("b", [11], 4, [1], False)], params[1:])
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
    batch.prepare([Scheduled("a", [1, 2], 0, [3], True), Scheduled("b", [1], 0, [4], True)],
                  [Params()] * 2)
    batch.forget(["a", "unknown"])  # finished (an id it never saw is ignored)
    assert "a" not in batch.rows and len(batch.free_rows) == 1
    # a new sequence takes the free row; a recomputed one (is_new) gets a fresh table
    inputs = batch.prepare([Scheduled("c", [5, 6], 0, [6], True),
                            Scheduled("b", [1, 9], 0, [2], True)], [Params()] * 2)
    assert inputs.attn_metadata.slot_mapping.tolist() == [24, 25, 8, 9]
    assert sorted(batch.rows) == ["b", "c"] and not batch.free_rows


@pytest.mark.parametrize("stage", DECODE_PADDING_STAGES)
def test_padding_rows_write_nowhere_and_read_no_keys(stage):
    module, batch = make_batch(stage)
    Params = load_stage(stage).SamplingParams
    batch.prepare([Scheduled("a", [1, 2, 3], 0, [1], True)], [Params()])
    inputs = batch.prepare([Scheduled("a", [4], 3, [], False)], [Params()], pad_to=4)
    md = inputs.attn_metadata
    assert inputs.input_ids.shape == (4,) and md.slot_mapping.tolist() == [7, -1, -1, -1]
    assert md.seq_lens.tolist() == [4, 0, 0, 0]
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("stage", STAGES)
def test_kept_sampling_parameters_match_parameters_built_per_step(stage):
    module, batch = make_batch(stage)
    mod = load_stage(stage)
    sampler = load_stage(f"{stage}.model_executor.layers.sampler")
    params = [mod.SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m)
              for t, p, k, m in [(0.0, 1.0, -1, 0.0), (0.7, 0.9, 5, 0.05), (1.3, 0.5, 0, 0.0)]]
    batch.prepare([Scheduled(str(i), [1], 0, [i], True) for i in range(3)], params)
    kept, built = batch.sampling_tensors(), sampler.SamplingTensors.from_params(params, "cpu")
    for name in ("temperature", "top_k", "top_p", "min_p", "is_greedy"):
        assert torch.equal(getattr(kept, name), getattr(built, name)), name
    assert kept.all_greedy is built.all_greedy is False
    batch.prepare([Scheduled("0", [2], 1, [], False)], params[:1])
    assert batch.sampling_tensors().all_greedy


# --- on a GPU --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("stage", DECODE_PADDING_STAGES)
def test_cuda_graph_replay_gives_the_tokens_of_eager_mode(stage, capsys):
    """Greedy tokens with decode steps replayed as CUDA graphs equal those of the same
    kernels launched eagerly: batches of 1, 5 (padded to 8) and 20 (padded to 32)."""
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
            assert runner.graphs.batch_sizes == [1, 2, 4, 8, 16, 32]
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
