"""Checks of M5's exercises: a chunk's size and the token after it, the running sequences
first, admitting waiting prompts into what is left, room for a whole prompt. Each test
runs on its exercise's package (the `stage` fixture), on a Scheduler with blocks of 4
tokens and sequences made here."""

from types import SimpleNamespace

import pytest

m51 = pytest.mark.exercise("m5.1")
m52 = pytest.mark.exercise("m5.2")
m53 = pytest.mark.exercise("m5.3")
m54 = pytest.mark.exercise("m5.4")

BLOCK = 4  # tokens per block in every test


class Tokenizer:
    """Enough of a tokenizer for the stop checker: every token decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def scheduler(stage, num_blocks=64, budget=16, chunk=None, max_batch_size=256):
    config = stage("config").EngineConfig(
        model="dummy:tiny-llama", block_size=BLOCK, max_num_batched_tokens=budget,
        max_chunk_size=chunk, max_batch_size=max_batch_size)
    checker = stage("core.sched.stop_checker").StopChecker(Tokenizer(), [0], 1000)
    return stage("core.sched.scheduler").Scheduler(config, num_blocks, checker)


def sequence(stage, seq_id, length, max_tokens=100):
    """A new sequence of a `length`-token prompt (tokens 1, 2, ...)."""
    params = stage("sampling_params").SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seq = stage("request").Sequence(seq_id, f"r{seq_id}", list(range(1, length + 1)), params)
    seq.metrics = stage("outputs").RequestMetrics(arrival_time=0.0)
    return seq


def waiting(stage, sched, seq_id, length, **kwargs):
    seq = sequence(stage, seq_id, length, **kwargs)
    sched.add_sequence(seq)
    return seq


def running(stage, sched, seq_id, length, computed, pending=0, **kwargs):
    """A running sequence of `length` known tokens, `computed` of them in the cache (it
    holds their blocks) and `pending` sampled on the device. computed = length - 1: a
    decode; less: a prompt part way through its chunks."""
    seq = sequence(stage, seq_id, length, **kwargs)
    seq.num_computed_tokens, seq.num_pending_tokens = computed, pending
    assert sched.kv_cache_manager.allocate_slots(seq, 0)
    seq.status = stage("request").SequenceStatus.RUNNING
    sched.running.append(seq)
    return seq


def names(chosen):
    return [(seq.name, n) for seq, n in chosen]


def held(seq):
    return len(seq.kv_blocks)


# --- m5.1: a chunk's size, and the token after it -------------------------------------

@m51
@pytest.mark.parametrize("length, computed, pending, budget, cap, want", [
    (10, 0, 0, 4, None, 4),     # the budget cuts the prompt
    (10, 0, 0, 20, None, 10),   # all of it fits
    (10, 0, 0, 10, None, 10),   # exactly
    (10, 6, 0, 20, None, 4),    # the rest of a prompt part way through
    (10, 0, 0, 20, 3, 3),       # max_chunk_size cuts it
    (10, 0, 0, 2, 3, 2),        # the budget, below the cap
    (10, 0, 0, 5, 8, 5),
    (10, 0, 0, 20, 1, 1),
    (10, 9, 0, 7, None, 1),     # a decode
    (10, 10, 1, 5, 3, 1),       # a decode whose token is still on the device
    (13, 0, 0, 9, None, 9),     # a preempted one recomputes its outputs too
])
def test_chunk_size(stage, length, computed, pending, budget, cap, want):
    sched = scheduler(stage, chunk=cap)
    seq = sequence(stage, 0, length)
    seq.num_computed_tokens, seq.num_pending_tokens = computed, pending
    assert sched._chunk(seq, budget) == want


@m51
def test_a_chunk_names_the_token_after_it(stage):
    sched = scheduler(stage)
    seq = sequence(stage, 0, 10)  # tokens 1..10
    for computed, n, new, after in [(0, 4, [1, 2, 3, 4], 5), (4, 4, [5, 6, 7, 8], 9),
                                    (8, 2, [9, 10], None), (0, 10, list(range(1, 11)), None),
                                    (0, 9, list(range(1, 10)), 10)]:
        seq.num_computed_tokens = computed
        scheduled = sched._scheduled(seq, n)
        assert scheduled.new_token_ids == new and scheduled.num_computed_tokens == computed
        assert scheduled.next_token_id == after, (computed, n)


@m51
def test_decodes_and_recomputed_outputs(stage):
    sched = scheduler(stage)
    PENDING = stage("core.sched.output").PENDING_TOKEN
    seq = sequence(stage, 0, 10)
    seq.token_ids.append(11)  # a decode: its output token's K/V are next
    seq.num_computed_tokens = 10
    got = sched._scheduled(seq, 1)
    assert got.new_token_ids == [11] and got.next_token_id is None
    seq.num_computed_tokens, seq.num_pending_tokens = 11, 1  # the next is on the device
    got = sched._scheduled(seq, 1)
    assert got.new_token_ids == [PENDING] and got.next_token_id is None
    seq.token_ids += [12, 13]  # preempted after 3 outputs: recomputed from 0
    seq.num_computed_tokens, seq.num_pending_tokens = 0, 0
    assert sched._scheduled(seq, 11).next_token_id == 12  # inside its outputs: no sample
    assert sched._scheduled(seq, 13).next_token_id is None


@m51
def test_a_prompt_goes_in_chunks_of_the_budget(stage):
    sched = scheduler(stage, budget=4)
    waiting(stage, sched, 0, 10)
    steps = []
    for _ in range(3):  # scheduled ahead: each step counts as computed at once
        [s] = sched.schedule().scheduled
        steps.append((s.num_computed_tokens, s.new_token_ids, s.next_token_id))
    assert steps == [(0, [1, 2, 3, 4], 5), (4, [5, 6, 7, 8], 9), (8, [9, 10], None)]


# --- m5.2: the running sequences first ---------------------------------------------------

def three_running(stage, sched):
    """A decode, a 20-token prompt with 8 computed, a decode; a 5-token prompt waits."""
    a = running(stage, sched, 0, 5, 4)
    b = running(stage, sched, 1, 20, 8)
    c = running(stage, sched, 2, 9, 8)
    d = waiting(stage, sched, 3, 5)
    return a, b, c, d


@m52
def test_running_sequences_come_first_oldest_first(stage):
    sched = scheduler(stage, budget=16)
    a, b, c, d = three_running(stage, sched)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 12), ("r2", 1), ("r3", 2)]
    assert (held(a), held(b), held(c), held(d)) == (2, 5, 3, 1)  # room for what runs


@m52
def test_the_budget_can_run_out_among_the_running(stage):
    sched = scheduler(stage, budget=5)
    a, b, c, d = three_running(stage, sched)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 4)]
    assert held(c) == 2 and list(sched.running) == [a, b, c] and list(sched.waiting) == [d]


@m52
def test_max_chunk_size_caps_a_running_prompt(stage):
    sched = scheduler(stage, budget=16, chunk=3)
    three_running(stage, sched)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 3), ("r2", 1), ("r3", 3)]


@m52
def test_a_sequence_whose_last_token_is_on_the_device_is_skipped(stage):
    sched = scheduler(stage, budget=16)
    last = running(stage, sched, 0, 6, 6, pending=1, max_tokens=1)  # its one token: pending
    a = running(stage, sched, 1, 5, 4)
    waiting(stage, sched, 2, 5)
    assert names(sched._schedule_by_budget()) == [("r1", 1), ("r2", 5)]
    assert list(sched.running)[:2] == [last, a]


@m52
def test_the_newest_is_preempted_and_no_prompt_is_admitted(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=6, budget=16)
    a = running(stage, sched, 0, 9, 8)  # holds 2 blocks, its decode needs a 3rd
    b = running(stage, sched, 1, 6, 5)  # holds 2, enough
    c = running(stage, sched, 2, 6, 5)  # holds 2: the pool is empty
    w = waiting(stage, sched, 3, 2)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 1)]
    assert c.status == Status.WAITING and c.kv_blocks == [] and c.num_computed_tokens == 0
    assert list(sched.running) == [a, b] and list(sched.waiting) == [c, w]
    assert sched.num_preemptions == 1 and held(a) == 3
    assert w.status == Status.WAITING  # the pool is short: no new prompt this step


@m52
def test_a_sequence_preempts_itself_when_it_is_the_newest(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=2, budget=4)
    a = running(stage, sched, 0, 9, 8)  # holds both blocks, needs a 3rd
    w = waiting(stage, sched, 1, 2)
    # no prompt is admitted after a preemption, not even a's first chunk (1 block of 2)
    assert sched._schedule_by_budget() == []
    assert a.status == Status.WAITING and list(sched.waiting) == [a, w]
    assert list(sched.running) == [] and sched.kv_cache_manager.num_free_blocks == 2


@m52
def test_decodes_go_on_while_a_long_prompt_is_cut(stage):
    """Two sequences decode; a 30-token prompt arrives; a budget of 8: every step gives
    each decode its token first, the prompt the 6 left, until its last chunk samples."""
    sched = scheduler(stage, budget=8)
    running(stage, sched, 0, 5, 4)
    running(stage, sched, 1, 7, 6)
    waiting(stage, sched, 2, 30)
    steps = []
    for _ in range(6):
        out = sched.schedule()
        assert out.num_batched_tokens <= 8
        steps.append([(s.seq_name, len(s.new_token_ids), s.next_token_id)
                      for s in out.scheduled])
        sampled = [7 if s.next_token_id is None else None for s in out.scheduled]
        sched.update_from_output(out, SimpleNamespace(
            sampled_token_ids=sampled, prompt_logprobs=[None] * len(sampled),
            logprobs=[None] * len(sampled)))
    decodes = [("r0", 1, None), ("r1", 1, None)]
    assert steps == [decodes + [("r2", 6, 6 * k + 7)] for k in range(4)] \
        + [decodes + [("r2", 6, None)], decodes + [("r2", 1, None)]]


# --- m5.3: waiting prompts in what is left ---------------------------------------------

@m53
def test_waiting_prompts_share_the_budget(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, budget=16)
    p, q, r = waiting(stage, sched, 0, 5), waiting(stage, sched, 1, 6), waiting(stage, sched, 2, 10)
    assert names(sched._schedule_by_budget()) == [("r0", 5), ("r1", 6), ("r2", 5)]
    assert list(sched.running) == [p, q, r] and not sched.waiting
    assert all(s.status == Status.RUNNING for s in (p, q, r))
    assert (held(p), held(q), held(r)) == (2, 2, 2)  # blocks for the chunk only


@m53
def test_a_long_prompt_starts_with_a_chunk_after_the_decodes(stage):
    sched = scheduler(stage, budget=16)
    a = running(stage, sched, 0, 5, 4)
    p, q = waiting(stage, sched, 1, 30), waiting(stage, sched, 2, 5)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 15)]
    assert list(sched.running) == [a, p] and list(sched.waiting) == [q] and held(p) == 4


@m53
def test_nothing_is_admitted_when_the_budget_is_spent(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, budget=2)
    running(stage, sched, 0, 5, 4)
    running(stage, sched, 1, 5, 4)
    p = waiting(stage, sched, 2, 3)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 1)]
    assert p.status == Status.WAITING and list(sched.waiting) == [p] and held(p) == 0


@m53
def test_max_batch_size_limits_admissions(stage):
    sched = scheduler(stage, budget=16, max_batch_size=2)
    running(stage, sched, 0, 5, 4)
    p, q = waiting(stage, sched, 1, 3), waiting(stage, sched, 2, 3)
    assert names(sched._schedule_by_budget()) == [("r0", 1), ("r1", 3)]
    assert list(sched.waiting) == [q] and len(sched.running) == 2


@m53
def test_first_come_first_served(stage):
    """The first waiting prompt has no room (its 10 blocks, beside the decode's): the
    smaller one behind it waits too."""
    sched = scheduler(stage, num_blocks=10, budget=16)
    running(stage, sched, 0, 5, 4)
    big, small = waiting(stage, sched, 1, 40), waiting(stage, sched, 2, 4)
    assert names(sched._schedule_by_budget()) == [("r0", 1)]
    assert list(sched.waiting) == [big, small] and held(big) == held(small) == 0


@m53
@pytest.mark.parametrize("second, admitted", [(36, False), (28, True)])
def test_an_admitted_prompts_later_chunks_are_promised(stage, second, admitted):
    """20 blocks. P (40 tokens, 10 blocks) comes in a 4-token chunk (1 block); its 9
    other blocks are promised: Q's whole prompt must fit in the 18 free blocks less those
    9, with 1 to spare."""
    sched = scheduler(stage, num_blocks=20, budget=16, chunk=4)
    running(stage, sched, 0, 4, 3)  # its decode fits in its block
    waiting(stage, sched, 1, 40)
    waiting(stage, sched, 2, second)
    want = [("r0", 1), ("r1", 4)] + ([("r2", 4)] if admitted else [])
    assert names(sched._schedule_by_budget()) == want


@m53
@pytest.mark.parametrize("second, admitted", [(40, False), (28, True)])
def test_a_running_prompts_rest_is_promised(stage, second, admitted):
    """20 blocks. B (40 tokens, 8 computed) takes a 4-token chunk: it holds 3 blocks and
    is promised 7 more. Q's 10 (or 7) blocks must fit beside those in the 17 free."""
    sched = scheduler(stage, num_blocks=20, budget=8, chunk=4)
    running(stage, sched, 0, 40, 8)
    waiting(stage, sched, 1, second)
    want = [("r0", 4)] + ([("r1", 4)] if admitted else [])
    assert names(sched._schedule_by_budget()) == want


# --- m5.4: room for the whole prompt -----------------------------------------------------

@m54
def test_blocks_promised_to_the_running(stage):
    sched = scheduler(stage, num_blocks=64)
    assert sched._blocks_promised() == 0
    running(stage, sched, 0, 5, 4)    # a decode at position 4: a 2nd block (1)
    running(stage, sched, 1, 6, 5)    # fits in its 2 blocks (0)
    running(stage, sched, 2, 40, 8)   # 32 tokens to go: 10 blocks in all, holds 2 (8)
    d = running(stage, sched, 3, 10, 0)  # a prompt admitted this step, with a chunk's block
    d.kv_blocks += sched.kv_cache_manager.block_pool.allocate(1)  # 3 blocks in all (2)
    running(stage, sched, 4, 6, 6, pending=1)  # its pending token: position 6, block 2 (0)
    running(stage, sched, 5, 8, 8, pending=1)  # position 8: a 3rd block (1)
    waiting(stage, sched, 6, 40)  # waiting ones are promised nothing
    assert sched._blocks_promised() == 1 + 0 + 8 + 2 + 0 + 1


@m54
@pytest.mark.parametrize("promised, admitted", [(9, True), (10, False), (0, True)])
def test_admit_keeps_room_for_the_whole_prompt(stage, promised, admitted):
    """20 free blocks, a 40-token prompt (10 blocks), others running: the free blocks less
    the promised ones less its 10 must leave the watermark (1)."""
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=20)
    seq = waiting(stage, sched, 0, 40)
    assert sched._admit(seq, 4, others_running=True, promised=promised) == admitted
    if admitted:
        assert seq.status == Status.RUNNING and not sched.waiting and held(seq) == 1
    else:
        assert seq.status == Status.WAITING and list(sched.waiting) == [seq]
        assert held(seq) == 0 and sched.kv_cache_manager.num_free_blocks == 20


@m54
def test_the_rest_counts_outputs_to_recompute(stage):
    sched = scheduler(stage, num_blocks=20)
    seq = waiting(stage, sched, 0, 36)
    seq.token_ids += [7, 7, 7, 7, 7]  # preempted after 5 outputs: 41 tokens, 11 blocks
    assert not sched._admit(seq, 4, others_running=True, promised=9)
    assert sched._admit(seq, 4, others_running=True, promised=8)


@m54
def test_the_watermark_scales_with_the_pool(stage):
    sched = scheduler(stage, num_blocks=300)  # 3 blocks to spare
    assert sched.watermark_blocks == 3
    seq = waiting(stage, sched, 0, 296 * BLOCK + 1)  # 297 blocks: 300 - 297 = 3, enough
    assert sched._admit(seq, 4, others_running=True, promised=0)
    sched = scheduler(stage, num_blocks=300)
    seq = waiting(stage, sched, 0, 297 * BLOCK + 1)  # 298 blocks: 2 left, too few
    assert not sched._admit(seq, 4, others_running=True, promised=0)


@m54
def test_alone_a_prompt_may_take_the_whole_pool(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=8)
    seq = waiting(stage, sched, 0, 40)  # 10 blocks: more than the pool, it goes in chunks
    assert sched._admit(seq, 8, others_running=False, promised=5)
    assert seq.status == Status.RUNNING and held(seq) == 2


@m54
@pytest.mark.parametrize("second, admitted", [(40, False), (28, True)])
def test_a_step_keeps_room_for_a_running_prompts_rest(stage, second, admitted):
    """Through a step: B (40 tokens) has 7 blocks still to take after its chunk; Q is
    admitted only if its whole prompt fits beside them."""
    sched = scheduler(stage, num_blocks=20, budget=8, chunk=4)
    running(stage, sched, 0, 40, 8)
    q = waiting(stage, sched, 1, second)
    want = [("r0", 4)] + ([("r1", 4)] if admitted else [])
    assert names(sched._schedule_by_budget()) == want
    assert held(q) == (1 if admitted else 0)
