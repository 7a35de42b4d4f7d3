"""Checks of M2's exercises: admission, the flat batch, a step's results, the batched
attention's mask. Each test runs on its exercise's package (the `stage` fixture)."""

import math
from types import SimpleNamespace

import pytest
import torch

m21 = pytest.mark.exercise("m2.1")
m22 = pytest.mark.exercise("m2.2")
m23 = pytest.mark.exercise("m2.3")
m24 = pytest.mark.exercise("m2.4")

CPU = torch.device("cpu")


class LetterTokenizer:
    """Token t is the letter chr(ord("a") + t % 26): enough for the stop checker."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def scheduler(stage, num_slots, tokenizer=None, **config):
    cfg = stage("config").EngineConfig(model="dummy:tiny-llama", **config)
    checker = stage("core.sched.stop_checker").StopChecker(tokenizer, [0], 1000)
    return stage("core.sched.scheduler").Scheduler(cfg, num_slots, checker)


def add(stage, sched, prompt_lengths, first_id=0, **params):
    """Waiting sequences r<id> with prompts of the given lengths (tokens 1, 2, ...)."""
    Sequence = stage("request").Sequence
    SamplingParams = stage("sampling_params").SamplingParams
    seqs = []
    for seq_id, length in enumerate(prompt_lengths, start=first_id):
        seq = Sequence(seq_id, f"r{seq_id}", list(range(1, length + 1)),
                       SamplingParams(**params))
        seq.metrics = stage("outputs").RequestMetrics(arrival_time=0.0)
        sched.add_sequence(seq)
        seqs.append(seq)
    return seqs


def ran(seqs, token=7):
    """What a step does to its sequences, written by hand: K/V cached, one token out."""
    for seq in seqs:
        seq.num_computed_tokens = len(seq.token_ids)
        seq.token_ids.append(token)


# -- m2.1: admission ----------------------------------------------------------------------------

@m21
def test_nothing_waits_nothing_runs(stage):
    sched = scheduler(stage, 4)
    out = sched.schedule()
    assert out.scheduled == [] and out.seqs == [] and out.num_batched_tokens == 0


@m21
def test_first_come_first_served_up_to_max_batch_size(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, 8, max_batch_size=3)
    seqs = add(stage, sched, [3, 2, 4, 1, 2])
    out = sched.schedule()
    assert out.seqs == seqs[:3] and list(sched.running) == seqs[:3]
    assert list(sched.waiting) == seqs[3:]
    assert [s.status for s in seqs] == [Status.RUNNING] * 3 + [Status.WAITING] * 2
    assert [s.kv_slot for s in seqs] == [0, 1, 2, None, None]
    assert [s.new_token_ids for s in out.scheduled] == [[1, 2, 3], [1, 2], [1, 2, 3, 4]]
    assert [s.block_ids for s in out.scheduled] == [[0], [1], [2]]
    assert out.num_batched_tokens == 9
    # the batch is full: the next step decodes the three, one token each
    ran(seqs[:3])
    out = sched.schedule()
    assert out.seqs == seqs[:3] and list(sched.waiting) == seqs[3:]
    assert [s.new_token_ids for s in out.scheduled] == [[7], [7], [7]]
    assert [s.num_computed_tokens for s in out.scheduled] == [3, 2, 4]


@m21
def test_the_token_budget_stops_admission_in_order(stage):
    sched = scheduler(stage, 8, max_num_batched_tokens=7)
    seqs = add(stage, sched, [4, 2, 5, 1])
    out = sched.schedule()
    # 4 + 2 fit; 5 would pass 7, and the 1 behind it (which would fit) waits its turn
    assert out.seqs == seqs[:2] and list(sched.waiting) == seqs[2:]
    assert out.num_batched_tokens == 6
    ran(seqs[:2])
    out = sched.schedule()
    assert out.seqs == seqs[2:] and list(sched.running) == seqs
    assert out.num_batched_tokens == 6
    assert [s.kv_slot for s in seqs] == [0, 1, 2, 3]  # a slot only for an admitted one


@m21
def test_prompts_that_fill_the_budget_exactly_go_together(stage):
    sched = scheduler(stage, 8, max_num_batched_tokens=7)
    seqs = add(stage, sched, [3, 4, 1])
    out = sched.schedule()
    assert out.seqs == seqs[:2] and out.num_batched_tokens == 7
    assert list(sched.waiting) == [seqs[2]]


@m21
def test_a_prompt_longer_than_the_budget_goes_alone(stage):
    sched = scheduler(stage, 8, max_num_batched_tokens=8)
    seqs = add(stage, sched, [20, 1])
    out = sched.schedule()
    assert out.seqs == [seqs[0]] and out.num_batched_tokens == 20
    assert list(sched.waiting) == [seqs[1]]


@m21
def test_no_free_slot_no_admission(stage):
    sched = scheduler(stage, 2, max_batch_size=8)
    seqs = add(stage, sched, [2, 2, 2])
    assert sched.schedule().seqs == seqs[:2]
    ran(seqs[:2])
    out = sched.schedule()  # the third waits for a slot: the step decodes the two
    assert out.seqs == seqs[:2] and list(sched.waiting) == [seqs[2]]
    assert [s.new_token_ids for s in out.scheduled] == [[7], [7]]
    sched.abort(seqs[0])  # slot 0 comes free
    out = sched.schedule()
    assert out.seqs == [seqs[2]] and seqs[2].kv_slot == 0
    assert list(sched.running) == [seqs[1], seqs[2]] and not sched.waiting


@m21
def test_new_prompts_go_before_decodes(stage):
    sched = scheduler(stage, 8, max_batch_size=3)
    first = add(stage, sched, [3, 3])
    sched.schedule()
    ran(first)
    late = add(stage, sched, [2, 2], first_id=2)
    out = sched.schedule()  # a prefill of only the one that fits beside the two running
    assert out.seqs == [late[0]] and out.scheduled[0].new_token_ids == [1, 2]
    assert list(sched.running) == first + [late[0]] and list(sched.waiting) == [late[1]]
    ran([late[0]])
    out = sched.schedule()  # full: every running one decodes
    assert out.seqs == first + [late[0]]
    assert all(s.new_token_ids == [7] for s in out.scheduled)


# -- m2.2: the flat batch ---------------------------------------------------------------------

def flat(stage, new_token_ids, computed, block_ids, block_size):
    return stage("worker.input_batch").prepare_inputs(new_token_ids, computed, block_ids,
                                                     block_size, CPU)


def as_lists(inputs):
    md = inputs.attn_metadata
    tensors = dict(input_ids=inputs.input_ids, positions=inputs.positions,
                   logits_indices=inputs.logits_indices, query_start_loc=md.query_start_loc,
                   seq_lens=md.seq_lens, block_tables=md.block_tables,
                   slot_mapping=md.slot_mapping)
    for name, t in tensors.items():
        assert t.dtype == torch.long, f"{name} is {t.dtype}, not torch.long"
    return {name: t.tolist() for name, t in tensors.items()} | dict(
        max_query_len=md.max_query_len, max_seq_len=md.max_seq_len)


@m22
def test_a_prefill_beside_a_decode(stage):
    # slots of 16 tokens: a prompt of 3 in slot 2, one new token at position 5 in slot 0
    got = as_lists(flat(stage, [[11, 12, 13], [21]], [0, 5], [[2], [0]], 16))
    assert got == dict(input_ids=[11, 12, 13, 21], positions=[0, 1, 2, 5],
                       logits_indices=[2, 3], query_start_loc=[0, 3, 4], seq_lens=[3, 6],
                       block_tables=[[2], [0]], slot_mapping=[32, 33, 34, 5],
                       max_query_len=3, max_seq_len=6)


@m22
def test_decodes_only(stage):
    got = as_lists(flat(stage, [[5], [6], [7]], [9, 0, 3], [[1], [2], [0]], 10))
    assert got == dict(input_ids=[5, 6, 7], positions=[9, 0, 3], logits_indices=[0, 1, 2],
                       query_start_loc=[0, 1, 2, 3], seq_lens=[10, 1, 4],
                       block_tables=[[1], [2], [0]], slot_mapping=[19, 20, 3],
                       max_query_len=1, max_seq_len=10)


@m22
def test_several_blocks_a_sequence_and_padded_block_tables(stage):
    got = as_lists(flat(stage, [[1, 2, 3, 4, 5, 6], [9], [4, 4]], [0, 2, 5],
                        [[3, 0], [1], [2, 5]], 4))
    assert got["positions"] == [0, 1, 2, 3, 4, 5, 2, 5, 6]
    assert got["slot_mapping"] == [12, 13, 14, 15, 0, 1, 6, 21, 22]
    assert got["block_tables"] == [[3, 0], [1, 0], [2, 5]]
    assert got["query_start_loc"] == [0, 6, 7, 9] and got["logits_indices"] == [5, 6, 8]
    assert got["seq_lens"] == [6, 3, 7] and got["max_seq_len"] == 7
    assert got["max_query_len"] == 6


# -- m2.3: a step's results ---------------------------------------------------------------------

def runner_output(tokens, logprobs=None, prompt_logprobs=None):
    return SimpleNamespace(sampled_token_ids=tokens,
                           logprobs=logprobs or [None] * len(tokens),
                           prompt_logprobs=prompt_logprobs or [None] * len(tokens))


@m23
def test_a_step_appends_and_advances(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, 4, tokenizer=LetterTokenizer())
    a, b = add(stage, sched, [3, 2], max_tokens=5)
    out = sched.schedule()
    assert sched.update_from_output(out, runner_output([3, 4])) == [a, b]
    assert a.token_ids == [1, 2, 3, 3] and b.token_ids == [1, 2, 4]
    assert a.num_computed_tokens == 3 and b.num_computed_tokens == 2  # not the sampled one
    assert a.output_text == "d" and b.status == Status.RUNNING
    out = sched.schedule()
    assert [s.new_token_ids for s in out.scheduled] == [[3], [4]]
    sched.update_from_output(out, runner_output([5, 6]))
    assert a.token_ids == [1, 2, 3, 3, 5] and a.num_computed_tokens == 4
    assert b.num_computed_tokens == 3 and a.output_text == "df"
    assert list(sched.running) == [a, b] and sched.finished_seq_names == []


@m23
def test_finished_sequences_leave_and_free_their_slots(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, 2, tokenizer=LetterTokenizer())
    a, b = add(stage, sched, [3, 2], max_tokens=2)
    c, = add(stage, sched, [4], first_id=2)
    out = sched.schedule()  # a and b take the two slots; c waits
    assert out.seqs == [a, b]
    sched.update_from_output(out, runner_output([3, 0]))  # b samples EOS (token 0)
    assert b.status == Status.FINISHED_STOPPED and b.kv_slot is None
    assert list(sched.running) == [a] and list(sched.free_slots) == [1]
    assert sched.finished_seq_names == ["r1"] and b.token_ids == [1, 2, 0]
    assert b.num_computed_tokens == 2
    out = sched.schedule()  # c takes b's slot at once
    assert out.seqs == [c] and c.kv_slot == 1 and out.finished_seq_names == ["r1"]
    sched.update_from_output(out, runner_output([8]))
    out = sched.schedule()
    assert out.seqs == [a, c] and sched.finished_seq_names == []
    advanced = sched.update_from_output(out, runner_output([5, 9]))
    assert advanced == [a, c]  # a finishing sequence still advanced: its output goes out
    assert a.status == Status.FINISHED_LENGTH_CAPPED and a.token_ids[-2:] == [3, 5]
    assert list(sched.running) == [c] and list(sched.free_slots) == [0]
    assert sched.finished_seq_names == ["r0"]


@m23
def test_logprobs_are_recorded_from_where_the_step_started(stage):
    sched = scheduler(stage, 2, tokenizer=LetterTokenizer())
    a, = add(stage, sched, [3], prompt_logprobs=0, logprobs=0)
    out = sched.schedule()
    prompt = [{2: (-0.5, 1)}, {3: (-1.5, 2)}]  # of prompt positions 1 and 2
    sched.update_from_output(out, runner_output([4], [{4: (-0.25, 1)}], [prompt]))
    assert [None if p is None else {t: (x.logprob, x.rank) for t, x in p.items()}
            for p in a.prompt_logprobs] == [None, {2: (-0.5, 1)}, {3: (-1.5, 2)}]
    assert [{t: x.logprob for t, x in p.items()} for p in a.output_logprobs] == [{4: -0.25}]


@m23
def test_abort_a_waiting_and_a_running_sequence(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, 1)
    a, b = add(stage, sched, [2, 2])
    sched.schedule()
    sched.abort(b)  # waiting: it has no slot to give back
    assert not sched.waiting and list(sched.free_slots) == []
    sched.abort(a)
    assert not sched.running and list(sched.free_slots) == [0] and a.kv_slot is None
    assert a.status == b.status == Status.FINISHED_ABORTED
    assert sched.finished_seq_names == ["r1", "r0"] and not sched.has_unfinished()


# -- m2.4: batched attention -------------------------------------------------------------------

def metadata(stage, query_lens, seq_lens, block_tables):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    width = max(len(t) for t in block_tables)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return stage("attention.metadata").AttentionMetadata(
        query_start_loc=long(starts), seq_lens=long(seq_lens),
        block_tables=long([t + [0] * (width - len(t)) for t in block_tables]),
        slot_mapping=long([0] * starts[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens))


def reference_attention(q, k_cache, v_cache, query_lens, seq_lens, block_tables, scale):
    """Each sequence on its own: gather its keys position by position, causal softmax."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size, group = k_cache.shape[1], heads // kv_heads
    outs, row = [], 0
    for n, seq_len, table in zip(query_lens, seq_lens, block_tables):
        where = [(table[p // block_size], p % block_size) for p in range(seq_len)]
        keys = torch.stack([k_cache[b, o] for b, o in where]).repeat_interleave(group, dim=1)
        values = torch.stack([v_cache[b, o] for b, o in where]).repeat_interleave(group, dim=1)
        for j in range(n):
            position = seq_len - n + j
            scores = torch.einsum("hd,shd->hs", q[row + j], keys[:position + 1]) * scale
            outs.append(torch.einsum("hs,shd->hd", scores.softmax(-1),
                                     values[:position + 1]).flatten())
        row += n
    return torch.stack(outs)


def written_cache(num_blocks, block_size, kv_heads, d, seq_lens, block_tables):
    """Random K/V at every written slot, NaN in every slot no sequence holds yet."""
    k = torch.full((num_blocks, block_size, kv_heads, d), math.nan)
    v = k.clone()
    for seq_len, table in zip(seq_lens, block_tables):
        for p in range(seq_len):
            b, o = table[p // block_size], p % block_size
            k[b, o], v[b, o] = torch.randn(kv_heads, d), torch.randn(kv_heads, d)
    return k, v


@m24
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (3, 1)])
def test_a_mixed_batch_equals_each_sequence_alone(stage, heads, kv_heads):
    backend = stage("attention.backends.torch_ref")
    torch.manual_seed(0)
    d, block_size, scale = 8, 4, 0.4
    # two decodes of different lengths, a whole prompt, a chunk after cached tokens
    query_lens, seq_lens = [1, 4, 1, 3], [6, 4, 1, 7]
    tables = [[3, 5], [0], [6], [1, 7]]
    k_cache, v_cache = written_cache(8, block_size, kv_heads, d, seq_lens, tables)
    q = torch.randn(sum(query_lens), heads, d)
    md = backend.build_metadata(metadata(stage, query_lens, seq_lens, tables), block_size,
                                heads // kv_heads)
    got = backend.TorchRefAttention(heads, kv_heads, d, scale).forward(q, k_cache, v_cache, md)
    want = reference_attention(q, k_cache, v_cache, query_lens, seq_lens, tables, scale)
    assert not got.isnan().any(), "a key past a sequence's end was read (NaN there)"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@m24
def test_the_decode_call_by_hand(stage):
    backend = stage("attention.backends.torch_ref")
    md = backend.build_metadata(metadata(stage, [1, 1], [3, 1], [[2, 1], [0]]), 2, 1)
    [call] = md.calls
    assert call.token_rows.tolist() == [0, 1]
    # positions 0, 1, 2 of blocks [2, 1] (block size 2); the short one re-reads position 0
    assert call.key_slots.tolist() == [[4, 5, 2], [0, 0, 0]]
    assert call.mask.tolist() == [[[[True, True, True]]], [[[True, False, False]]]]


@m24
def test_a_prompt_call_by_hand_with_two_heads_a_group(stage):
    backend = stage("attention.backends.torch_ref")
    md = backend.build_metadata(metadata(stage, [2, 1], [3, 2], [[1, 0], [2]]), 2, 2)
    prompt = [c for c in md.calls if c.key_slots.shape[0] == 1 and len(c.token_rows) == 2]
    [call] = prompt
    assert call.token_rows.tolist() == [0, 1] and call.key_slots.tolist() == [[2, 3, 0]]
    # queries at positions 1 and 2, each twice (its two heads)
    assert call.mask.tolist() == [[[[True, True, False], [True, True, False],
                                    [True, True, True], [True, True, True]]]]
