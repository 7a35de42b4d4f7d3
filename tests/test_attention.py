"""The attention layer against a naive per-sequence softmax, on a mixed batch.

Introduced with the one shape of a step (M2 on). A batch mixes what a step can hold:
whole prompts, decodes (one new token after many cached ones), and sequences whose first
tokens are already in the cache with several new ones after them (what M5's chunks and
M6's prefix hits will be). K/V of the cached tokens sit in scattered cache blocks; every
other slot holds NaN, so reading anything unwritten shows. The reference computes, for
each sequence and each query head alone, softmax(q k^T * scale) v over the keys at or
before the query's position, with the query head mapped to its kv head (GQA).
"""

import inspect
import math

import pytest
import torch

from conftest import load_stage, stages_with

STAGES = stages_with("batching")

# (tokens already in the cache, new tokens) per sequence.
MIXED_BATCH = [(0, 7), (9, 1), (5, 6), (0, 1), (16, 1), (3, 13), (31, 2)]


def naive_attention(q, keys, values, first_position, scale, group):
    """q: [n, H, d] at positions first_position.., keys/values: [L, K, d] -> [n, H * d]."""
    rows = []
    for i in range(q.shape[0]):
        position = first_position + i
        heads = []
        for h in range(q.shape[1]):
            k, v = keys[:position + 1, h // group], values[:position + 1, h // group]
            weights = torch.softmax((k @ q[i, h]) * scale, dim=0)
            heads.append(weights @ v)
        rows.append(torch.cat(heads))
    return torch.stack(rows)


class NoRotation(torch.nn.Module):
    """A rotary module that rotates nothing (angle 0 at every position): from M4 on the
    layer rotates q and k itself, and this test is about attention alone."""

    def forward(self, positions, q, k):
        return q, k


def run_layer(stage, num_heads, num_kv_heads, head_dim, block_size, batch, seed=0):
    """(layer output, reference output, caches after the step, slots of the new tokens)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(head_dim)
    Attention = load_stage(f"{stage}.attention.layer").Attention
    rotates = "rotary" in inspect.signature(Attention).parameters  # M4 on: the layer rotates
    layer = Attention(num_heads, num_kv_heads, head_dim, scale,
                      *([NoRotation()] if rotates else []))
    prepare_inputs = load_stage(f"{stage}.worker.input_batch").prepare_inputs
    num_blocks = sum(-(-(c + n) // block_size) for c, n in batch) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    free = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered at random
    new_ids, starts, tables, full_keys, full_values = [], [], [], [], []
    qs, ks, vs = [], [], []
    for cached, new in batch:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        keys = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        for p in range(cached):  # what earlier steps wrote
            k_cache[table[p // block_size], p % block_size] = keys[p]
            v_cache[table[p // block_size], p % block_size] = values[p]
        new_ids.append([5] * new)
        starts.append(cached)
        tables.append(table)
        full_keys.append(keys)
        full_values.append(values)
        qs.append(torch.randn(new, num_heads, head_dim, generator=gen))
        ks.append(keys[cached:])
        vs.append(values[cached:])
    inputs = prepare_inputs(new_ids, starts, tables, block_size, torch.device("cpu"))
    group = num_heads // num_kv_heads
    build_metadata = load_stage(f"{stage}.attention.backends.torch_ref").build_metadata
    out = layer(*([inputs.positions] if rotates else []),
                torch.cat(qs), torch.cat(ks), torch.cat(vs), (k_cache, v_cache),
                build_metadata(inputs.attn_metadata, block_size, group))
    ref = torch.cat([naive_attention(q, k, v, c, scale, group)
                     for q, k, v, (c, _) in zip(qs, full_keys, full_values, batch)])
    return out, ref, (k_cache, v_cache), inputs, (full_keys, full_values)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [13, 16])
def test_mixed_batch_matches_naive_softmax(stage, num_heads, num_kv_heads, head_dim):
    out, ref, _, inputs, _ = run_layer(stage, num_heads, num_kv_heads, head_dim,
                                       block_size=4, batch=MIXED_BATCH)
    assert out.shape == (sum(n for _, n in MIXED_BATCH), num_heads * head_dim)
    assert not out.isnan().any(), "attention read a slot nothing was written to"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    md = inputs.attn_metadata
    assert md.seq_lens.tolist() == [c + n for c, n in MIXED_BATCH]
    assert md.query_start_loc.tolist()[-1] == sum(n for _, n in MIXED_BATCH)
    assert md.max_query_len == 13 and md.max_seq_len == 33


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_new_keys_are_written_to_their_slots(stage, block_size):
    batch = [(0, 5), (7, 1), (2, 9)]
    _, _, (k_cache, v_cache), inputs, (keys, values) = run_layer(
        stage, 4, 2, 8, block_size=block_size, batch=batch)
    tables = inputs.attn_metadata.block_tables.tolist()
    for (cached, new), table, k, v in zip(batch, tables, keys, values):
        for p in range(cached + new):
            assert torch.equal(k_cache[table[p // block_size], p % block_size], k[p])
            assert torch.equal(v_cache[table[p // block_size], p % block_size], v[p])
    written = (~k_cache.isnan().any(-1).any(-1)).sum().item()
    assert written == sum(c + n for c, n in batch), "a write went to a slot of nobody"
