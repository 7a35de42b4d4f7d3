"""Checks of M1's exercises: attention over the KV cache, top-p, the penalties, top-k and
min-p. Each test runs on its exercise's package (the `stage` fixture)."""

import math

import pytest
import torch

m11 = pytest.mark.exercise("m1.1")
m12 = pytest.mark.exercise("m1.2")
m13 = pytest.mark.exercise("m1.3")
m14 = pytest.mark.exercise("m1.4")

NEG_INF = float("-inf")


# -- m1.1: attention over the KV cache ---------------------------------------------------

def causal_attention(q, k, v, scale):
    """The whole sequence at once, written out: q [T, H, d], k and v [T, KV, d] ->
    [T, H * d]. Query head h reads kv head h // (H // KV)."""
    num_tokens, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, NEG_INF).softmax(dim=-1)
    return torch.einsum("hts,shd->thd", weights, v).reshape(num_tokens, heads * d)


def run_in_chunks(stage, heads, kv_heads, chunks, d=8, scale=0.3, seed=0):
    """Feed one sequence through the layer chunk by chunk (prefill, then decodes);
    returns the outputs of every step, the reference, the cache and q, k, v."""
    layer_mod = stage("attention.layer")
    torch.manual_seed(seed)
    total = sum(chunks)
    q, k, v = torch.randn(total, heads, d), torch.randn(total, kv_heads, d), \
        torch.randn(total, kv_heads, d)
    max_len = total + 3  # room past the end: never written, never read (NaN shows it)
    cache = (torch.full((max_len, kv_heads, d), math.nan),
             torch.full((max_len, kv_heads, d), math.nan))
    layer = layer_mod.Attention(heads, kv_heads, d, scale)
    outs, start = [], 0
    for n in chunks:
        out = layer(q[start:start + n], k[start:start + n], v[start:start + n], cache,
                    layer_mod.AttentionMetadata(start_pos=start))
        assert out.shape == (n, heads * d)
        outs.append(out)
        start += n
    return torch.cat(outs), causal_attention(q, k, v, scale), cache, (q, k, v)


@m11
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_prefill_then_decodes_equal_full_causal_attention(stage, heads, kv_heads):
    got, want, _, _ = run_in_chunks(stage, heads, kv_heads, [4, 1, 1, 1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@m11
def test_the_cache_holds_every_token_at_its_position(stage):
    _, _, (k_cache, v_cache), (_, k, v) = run_in_chunks(stage, 4, 2, [5, 1, 1])
    assert torch.equal(k_cache[:7], k) and torch.equal(v_cache[:7], v)
    assert k_cache[7:].isnan().all() and v_cache[7:].isnan().all()  # nothing past the end


@m11
def test_a_chunk_after_cached_tokens_is_causal_from_its_start(stage):
    # several new tokens at start_pos 3: each sees the cache and the new ones before it
    got, want, _, _ = run_in_chunks(stage, 4, 2, [3, 3, 1, 2], seed=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@m11
def test_a_one_token_prompt_and_decode_from_scratch(stage):
    got, want, _, _ = run_in_chunks(stage, 2, 1, [1, 1, 1], seed=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- m1.2: top-p ----------------------------------------------------------------------------

def logits_of(*probs_rows):
    return torch.tensor(probs_rows, dtype=torch.float32).log()


def kept(logits):
    return [[j for j, x in enumerate(row) if x != NEG_INF] for row in logits.tolist()]


@m12
@pytest.mark.parametrize("top_p, want", [
    (0.45, [0]), (0.55, [0, 1]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.97, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_that_reaches_p(stage, top_p, want):
    top_p_mask = stage("model_executor.layers.sampler").top_p_mask
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    out = top_p_mask(logits.clone(), torch.tensor([top_p]))
    assert kept(out) == [want]
    kept_ids = torch.tensor(want)
    assert torch.equal(out[0, kept_ids], logits[0, kept_ids])  # kept logits unchanged


@m12
def test_top_p_in_vocabulary_order(stage):
    top_p_mask = stage("model_executor.layers.sampler").top_p_mask
    # the same distribution shuffled: ids 3 (0.5), 0 (0.3), 4 (0.15), 1 (0.04), 2 (0.01)
    logits = logits_of([0.3, 0.04, 0.01, 0.5, 0.15])
    assert kept(top_p_mask(logits.clone(), torch.tensor([0.7]))) == [[0, 3]]
    assert kept(top_p_mask(logits.clone(), torch.tensor([0.9]))) == [[0, 3, 4]]


@m12
def test_top_p_per_row(stage):
    top_p_mask = stage("model_executor.layers.sampler").top_p_mask
    logits = logits_of([0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.2, 0.2, 0.6])
    out = kept(top_p_mask(logits.clone(), torch.tensor([0.65, 0.6, 1.0])))
    assert out[0] == [1, 2] and out[2] == [0, 1, 2]
    # row 1: 0.5, then one of the tied 0.25s reaches 0.6; exactly one of them stays
    assert 2 in out[1] and len(out[1]) == 2


@m12
def test_top_p_keeps_exactly_enough_of_tied_tokens(stage):
    top_p_mask = stage("model_executor.layers.sampler").top_p_mask
    out = top_p_mask(torch.zeros(1, 8), torch.tensor([0.3]))  # 8 tokens of 0.125
    assert len(kept(out)[0]) == 3  # 0.25 < 0.3 <= 0.375: three are needed, not all eight
    out = top_p_mask(torch.zeros(2, 4), torch.tensor([0.5, 0.75]))  # 4 tokens of 0.25
    assert [len(row) for row in kept(out)] == [2, 3]  # two reach 0.5 exactly: enough
    # 0.464, then 0.171 three times, 0.023: the first and two of the tied reach 0.7
    out = kept(top_p_mask(torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0]]), torch.tensor([0.7])))
    assert 0 in out[0] and 4 not in out[0] and len(out[0]) == 3


@m12
def test_top_p_always_keeps_the_most_likely_token(stage):
    top_p_mask = stage("model_executor.layers.sampler").top_p_mask
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 5.5, -2.0]])
    out = top_p_mask(logits.clone(), torch.tensor([1e-6, 1e-6]))
    assert kept(out) == [[1], [1]]
    # a row already cut by top-k (-inf) keeps its cut
    out = top_p_mask(torch.tensor([[NEG_INF, 1.0, 0.0, NEG_INF]]), torch.tensor([1.0]))
    assert kept(out) == [[1, 2]]


# -- m1.3: penalties ----------------------------------------------------------------------------

def row(stage, prompt, output, **params):
    sampler = stage("model_executor.layers.sampler")
    sp = stage("sampling_params").SamplingParams(**params)
    return sampler.SamplingRow(sp, list(prompt), list(output), None, [])


def penalize(stage, logits, rows):
    apply_penalties = stage("model_executor.layers.sampler").apply_penalties
    return apply_penalties(torch.tensor(logits, dtype=torch.float32), rows).tolist()


@m13
def test_repetition_then_frequency_and_presence(stage):
    r = row(stage, [0, 1, 1], [2, 2, 4], repetition_penalty=2.0, frequency_penalty=0.5,
            presence_penalty=0.25)
    # repetition over {0, 1, 2, 4}, each once: 2 -> 1, -1 -> -2, 0.5 -> 0.25, 0 -> 0;
    # then token 2 (twice in the output): 0.25 - 2 * 0.5 - 0.25; token 4 (once): 0 - 0.75
    got = penalize(stage, [[2.0, -1.0, 0.5, 3.0, 0.0, -2.0]], [r])
    assert got == [[1.0, -2.0, -1.0, 3.0, -0.75, -2.0]]


@m13
def test_a_repetition_penalty_below_one_favours_seen_tokens(stage):
    r = row(stage, [1], [3], repetition_penalty=0.5)
    got = penalize(stage, [[1.0, 1.5, 1.0, -4.0]], [r])
    assert got == [[1.0, 3.0, 1.0, -2.0]]


@m13
def test_presence_and_frequency_ignore_the_prompt(stage):
    r = row(stage, [0, 1, 2], [], presence_penalty=1.0, frequency_penalty=1.0)
    assert penalize(stage, [[1.0, 2.0, 3.0]], [r]) == [[1.0, 2.0, 3.0]]
    r = row(stage, [0, 1, 2], [1, 1, 1], presence_penalty=2.0, frequency_penalty=-0.5)
    assert penalize(stage, [[1.0, 2.0, 3.0]], [r]) == [[1.0, 2.0 + 1.5 - 2.0, 3.0]]


@m13
def test_each_row_with_its_own_penalties(stage):
    rows = [row(stage, [0], [1], repetition_penalty=4.0),
            row(stage, [0], [1, 1], frequency_penalty=1.0),
            row(stage, [0], [1])]
    got = penalize(stage, [[8.0, -1.0], [8.0, -1.0], [8.0, -1.0]], rows)
    assert got == [[2.0, -4.0], [8.0, -3.0], [8.0, -1.0]]


# -- m1.4: top-k and min-p ----------------------------------------------------------------------

@m14
@pytest.mark.parametrize("k, want", [
    (1, [1]), (2, [1, 3]), (4, [1, 2, 3, 4]), (5, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4]),
    (0, [0, 1, 2, 3, 4]), (-1, [0, 1, 2, 3, 4])])
def test_top_k(stage, k, want):
    top_k_mask = stage("model_executor.layers.sampler").top_k_mask
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_mask(logits.clone(), torch.tensor([k]))
    assert kept(out) == [want]
    assert torch.equal(out[0, want], logits[0, want])


@m14
def test_top_k_per_row_and_ties(stage):
    top_k_mask = stage("model_executor.layers.sampler").top_k_mask
    logits = torch.tensor([[3.0, 3.0, 1.0, 3.0], [0.0, 2.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    out = top_k_mask(logits.clone(), torch.tensor([2, 1, 3]))
    # ties with the k-th largest value all stay
    assert kept(out) == [[0, 1, 3], [1, 3], [1, 2, 3]]


@m14
@pytest.mark.parametrize("min_p, want", [
    (0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2, 3]), (0.3, [0, 1, 2]), (0.6, [0, 1]), (0.8, [0]),
    (1.0, [0])])
def test_min_p(stage, min_p, want):
    min_p_mask = stage("model_executor.layers.sampler").min_p_mask
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    out = min_p_mask(logits.clone(), torch.tensor([min_p]))
    assert kept(out) == [want]
    assert torch.equal(out[0, want], logits[0, want])


@m14
def test_min_p_per_row_in_vocabulary_order(stage):
    min_p_mask = stage("model_executor.layers.sampler").min_p_mask
    logits = logits_of([0.1, 0.6, 0.3], [0.3, 0.3, 0.4])
    # row 0: threshold 0.4 * 0.6 = 0.24; row 1: 0.8 * 0.4 = 0.32
    assert kept(min_p_mask(logits.clone(), torch.tensor([0.4, 0.8]))) == [[1, 2], [2]]
    # a row already cut (-inf) keeps its cut; its probabilities are of what is left
    cut = torch.tensor([[NEG_INF, 0.0, math.log(0.5)]])
    assert kept(min_p_mask(cut, torch.tensor([0.6]))) == [[1]]
