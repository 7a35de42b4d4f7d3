"""M4's small fused Triton kernels (RMSNorm, add + RMSNorm, silu-and-mul, rotary, rotary
with the KV-cache write) against their torch references.

On the CPU they run under the Triton interpreter (TRITON_INTERPRET=1, set here before
the kernels are defined) in fp32 (and fp16) on tiny shapes: hidden sizes that are and
are not powers of two, head_dim 40/64/80, GQA, unsorted positions, q/k as strided views
of one projection output. The `gpu` tests run the compiled kernels in bf16 and fp16 at
real shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from m4_flash_attn.ops import activation, rms_norm, rotary  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_DEVICE = "cpu" if INTERPRETED else "cuda"  # where the non-gpu tests run their kernels
FP32 = {"atol": 1e-5, "rtol": 1e-5}
LOW_PRECISION = {torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
                 torch.float16: {"atol": 1e-3, "rtol": 1e-3}}


def _randn(*shape, seed=0, dtype=torch.float32, device=CPU_DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def _norm_weight(hidden, seed=1, dtype=torch.float32, device=CPU_DEVICE):
    return (1.0 + 0.2 * _randn(hidden, seed=seed, device="cpu")).to(device=device, dtype=dtype)


def _rope_tables(head_dim, max_position=64, theta=10000.0, device=CPU_DEVICE):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_position).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def _qkv_views(num_tokens, heads, kv_heads, head_dim, seed=0, dtype=torch.float32,
               device=CPU_DEVICE):
    """q and k sliced out of one [T, (heads + 2 * kv_heads) * d] projection output."""
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, seed=seed, dtype=dtype,
                 device=device)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, kv_heads, head_dim)
    return qkv, q, k


def _assert_mostly_bit_exact(got, want, fraction):
    """The kernel rounds where the reference rounds: in fp16/bf16 nearly every element is
    identical (a rare last-bit flip comes from a different summation order or rsqrt).
    Skipping one of the reference's roundings leaves only about 3 in 4 identical."""
    same = (got == want).float().mean().item()
    assert same >= fraction, f"only {same:.1%} of the elements are bit-identical"


# -- CPU (interpreter) or compiled fp32 tests --------------------------------------------
@pytest.mark.parametrize("hidden", [64, 80, 100])
def test_rms_norm_matches_the_reference(hidden):
    x = _randn(5, hidden, scale=3.0)
    w = _norm_weight(hidden)
    got = rms_norm.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, rms_norm.rms_norm_ref(x, w, 1e-6), **FP32)
    assert got.shape == x.shape and got.dtype == x.dtype
    # normalised: rms of got / w is 1 in every row
    torch.testing.assert_close((got / w).pow(2).mean(-1), torch.ones(5, device=x.device),
                               atol=1e-4, rtol=1e-4)


def test_rms_norm_eps_matters():
    x = _randn(3, 64, scale=1e-3)
    w = _norm_weight(64)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(rms_norm.rms_norm(x, w, eps),
                                   rms_norm.rms_norm_ref(x, w, eps), **FP32)


@pytest.mark.parametrize("head_dim", [40, 64, 80])
def test_rms_norm_per_head_on_a_strided_view(head_dim):
    """Qwen3's q/k norm: [T, heads, d] read out of the middle of a qkv projection."""
    qkv, q, k = _qkv_views(4, 4, 2, head_dim, seed=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    before = qkv.clone()
    w = _norm_weight(head_dim, seed=3)
    for x in (q, k):
        got = rms_norm.rms_norm(x, w, 1e-6)
        torch.testing.assert_close(got, rms_norm.rms_norm_ref(x, w, 1e-6), **FP32)
        assert got.shape == x.shape
    assert torch.equal(qkv, before)  # the input is not touched


def test_rms_norm_fp16_rounds_like_torch():
    x = _randn(8, 100, dtype=torch.float16, scale=2.0)
    w = _norm_weight(100, dtype=torch.float16)
    got, want = rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, **LOW_PRECISION[torch.float16])
    _assert_mostly_bit_exact(got, want, 0.98)


@pytest.mark.parametrize("hidden", [64, 80, 100])
def test_fused_add_rms_norm_matches_the_reference(hidden):
    x, residual = _randn(5, hidden, seed=4), _randn(5, hidden, seed=5, scale=2.0)
    w = _norm_weight(hidden)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = rms_norm.fused_add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_residual = rms_norm.fused_add_rms_norm_ref(x, residual, w, 1e-6)
    assert torch.equal(new_residual, want_residual)  # an add in the dtype: exact
    torch.testing.assert_close(normed, want_normed, **FP32)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_fused_add_rms_norm_fp16():
    x = _randn(8, 80, seed=6, dtype=torch.float16)
    residual = _randn(8, 80, seed=7, dtype=torch.float16, scale=4.0)
    w = _norm_weight(80, dtype=torch.float16)
    normed, new_residual = rms_norm.fused_add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_residual = rms_norm.fused_add_rms_norm_ref(x, residual, w, 1e-6)
    assert new_residual.dtype == torch.float16 and torch.equal(new_residual, want_residual)
    torch.testing.assert_close(normed, want_normed, **LOW_PRECISION[torch.float16])
    _assert_mostly_bit_exact(normed, want_normed, 0.98)


@pytest.mark.parametrize("width", [64, 100, 1100])  # 1100: two column tiles, one partial
def test_silu_and_mul_matches_the_reference(width):
    gate, up = _randn(3, width, seed=8, scale=4.0), _randn(3, width, seed=9)
    got = activation.silu_and_mul(gate, up)
    torch.testing.assert_close(got, activation.silu_and_mul_ref(gate, up), **FP32)
    assert got.shape == gate.shape


def test_silu_and_mul_on_halves_of_a_merged_projection():
    gate_up = _randn(4, 2 * 80, seed=10, scale=4.0)
    gate, up = gate_up[:, :80], gate_up[:, 80:]
    assert not gate.is_contiguous()
    torch.testing.assert_close(activation.silu_and_mul(gate, up),
                               activation.silu_and_mul_ref(gate, up), **FP32)


def test_silu_and_mul_fp16():
    gate = _randn(8, 100, seed=11, dtype=torch.float16, scale=4.0)
    up = _randn(8, 100, seed=12, dtype=torch.float16)
    got, want = activation.silu_and_mul(gate, up), activation.silu_and_mul_ref(gate, up)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, **LOW_PRECISION[torch.float16])
    _assert_mostly_bit_exact(got, want, 0.98)


@pytest.mark.parametrize("head_dim", [40, 64, 80])
@pytest.mark.parametrize("position_dtype", [torch.int64, torch.int32])
def test_rotary_matches_the_reference(head_dim, position_dtype):
    heads, kv_heads = 4, 2  # GQA
    qkv, q, k = _qkv_views(5, heads, kv_heads, head_dim, seed=13)
    before = qkv.clone()
    cos, sin = _rope_tables(head_dim)
    positions = torch.tensor([7, 0, 63, 3, 3], dtype=position_dtype, device=q.device)
    q_out, k_out = rotary.apply_rotary(q, k, positions, cos, sin)
    q_want, k_want = rotary.apply_rotary_ref(q, k, positions, cos, sin)
    torch.testing.assert_close(q_out, q_want, **FP32)
    torch.testing.assert_close(k_out, k_want, **FP32)
    assert torch.equal(qkv, before)  # not in place: the caller's views keep their values
    # position 0 is the identity; other positions do rotate
    torch.testing.assert_close(q_out[1], q[1], **FP32)
    assert not torch.allclose(q_out[0], q[0])


def test_rotary_matches_the_models_torch_rotary():
    """The same rotation as M0's RotaryEmbedding module (fp32, so no rounding differs)."""
    from m4_flash_attn.model_executor.layers.rotary_embedding import RotaryEmbedding

    head_dim = 64
    module = RotaryEmbedding(head_dim, max_position=64, theta=10000.0)
    _, q, k = _qkv_views(3, 4, 2, head_dim, seed=14)
    positions = torch.tensor([5, 60, 1], device=q.device)
    want = module(positions, q, k)  # (builds the module's cos/sin tables)
    got = rotary.apply_rotary(q, k, positions, module.cos, module.sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _cache_case(num_tokens, heads, kv_heads, head_dim, seed, dtype=torch.float32,
                device=CPU_DEVICE, num_blocks=6, block_size=4):
    """q, k, v as views of one projection; caches with old contents; unsorted slots with
    padding (-1) among them."""
    qkv, q, k = _qkv_views(num_tokens, heads, kv_heads, head_dim, seed=seed, dtype=dtype,
                           device=device)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    v = qkv[:, q_size + kv_size:].view(num_tokens, kv_heads, head_dim)
    caches = [_randn(num_blocks, block_size, kv_heads, head_dim, seed=seed + 1, dtype=dtype,
                     device=device) for _ in range(2)]
    g = torch.Generator().manual_seed(seed + 2)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1
    return qkv, q, k, v, caches, slots.to(device=device, dtype=torch.int32)


@pytest.mark.parametrize("head_dim", [40, 64, 80])
def test_rotary_and_cache_write_matches_the_reference(head_dim):
    """One kernel: q rotated (returned), k rotated into its slot, v copied into its slot,
    padding tokens (slot -1) written nowhere, every other cache row left as it was."""
    qkv, q, k, v, (k_cache, v_cache), slots = _cache_case(7, 4, 2, head_dim, seed=30)
    before = qkv.clone()
    cos, sin = _rope_tables(head_dim)
    positions = torch.tensor([7, 0, 63, 3, 3, 12, 40], device=q.device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = rotary.rotary_and_write_kv_ref(q, k, v, positions, cos, sin, want_k, want_v,
                                            slots)
    got_q = rotary.rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(got_q, want_q, **FP32)
    torch.testing.assert_close(k_cache, want_k, **FP32)
    assert torch.equal(v_cache, want_v)  # copied as it is
    assert torch.equal(qkv, before)
    # the reference itself: written rows hold the rotated k, the others are untouched
    rows = want_k.view(-1, 2, head_dim)
    _, k_rot = rotary.apply_rotary_ref(q, k, positions, cos, sin)
    real = (slots >= 0).nonzero().flatten()
    torch.testing.assert_close(rows[slots[real].long()], k_rot[real], **FP32)
    untouched = torch.ones(rows.shape[0], dtype=torch.bool)
    untouched[slots[real].long()] = False
    assert torch.equal(rows[untouched], k_cache.view(-1, 2, head_dim)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [40, 64])
def test_rotary_and_cache_write_with_qwen3_qk_norm(dtype, head_dim):
    """With the per-head q/k RMSNorm fused in: the same as the model's norm modules, then
    the rotation, then the write (fp16: the reference's roundings, nearly bit for bit)."""
    _, q, k, v, (k_cache, v_cache), slots = _cache_case(6, 4, 2, head_dim, seed=33,
                                                        dtype=dtype)
    cos, sin = _rope_tables(head_dim)
    positions = torch.tensor([1, 0, 63, 9, 30, 2], device=q.device)
    norms = (_norm_weight(head_dim, seed=34, dtype=dtype), _norm_weight(head_dim, seed=35,
                                                                        dtype=dtype), 1e-6)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = rotary.rotary_and_write_kv_ref(q, k, v, positions, cos, sin, want_k, want_v,
                                            slots, norms)
    got_q = rotary.rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slots,
                                       norms)
    tol = FP32 if dtype == torch.float32 else LOW_PRECISION[dtype]
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(k_cache, want_k, **tol)
    if dtype != torch.float32:
        _assert_mostly_bit_exact(got_q, want_q, 0.97)
    # the norm is really applied: without it the result differs
    plain = rotary.rotary_and_write_kv_ref(q, k, v, positions, cos, sin, k_cache.clone(),
                                           v_cache.clone(), slots)
    assert not torch.allclose(plain, want_q, **tol)


# -- GPU: compiled kernels, bf16 and fp16, real shapes -------------------------------------
GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [896, 1024])
def test_gpu_rms_norm(dtype, num_tokens, hidden):
    x = _randn(num_tokens, hidden, seed=20, dtype=dtype, device="cuda", scale=3.0)
    residual = _randn(num_tokens, hidden, seed=21, dtype=dtype, device="cuda", scale=3.0)
    w = _norm_weight(hidden, dtype=dtype, device="cuda")
    tol = LOW_PRECISION[dtype]
    got, want = rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6)
    torch.testing.assert_close(got, want, **tol)
    _assert_mostly_bit_exact(got, want, 0.95)
    normed, new_residual = rms_norm.fused_add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_residual = rms_norm.fused_add_rms_norm_ref(x, residual, w, 1e-6)
    assert torch.equal(new_residual, want_residual)
    torch.testing.assert_close(normed, want_normed, **tol)
    _assert_mostly_bit_exact(normed, want_normed, 0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_per_head_rms_norm_and_rotary(dtype, num_tokens, head_dim):
    heads, kv_heads = 14, 2
    _, q, k = _qkv_views(num_tokens, heads, kv_heads, head_dim, seed=22, dtype=dtype,
                         device="cuda")
    w = _norm_weight(head_dim, dtype=dtype, device="cuda")
    tol = LOW_PRECISION[dtype]
    torch.testing.assert_close(rms_norm.rms_norm(q, w, 1e-6),
                               rms_norm.rms_norm_ref(q, w, 1e-6), **tol)
    cos, sin = _rope_tables(head_dim, max_position=4096, theta=1e6, device="cuda")
    g = torch.Generator().manual_seed(23)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to("cuda")
    got = rotary.apply_rotary(q, k, positions, cos, sin)
    want = rotary.apply_rotary_ref(q, k, positions, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_gpu_silu_and_mul(dtype, num_tokens):
    width = 4864
    gate_up = _randn(num_tokens, 2 * width, seed=24, dtype=dtype, device="cuda", scale=4.0)
    gate, up = gate_up[:, :width], gate_up[:, width:]
    got, want = activation.silu_and_mul(gate, up), activation.silu_and_mul_ref(gate, up)
    torch.testing.assert_close(got, want, **LOW_PRECISION[dtype])
    _assert_mostly_bit_exact(got, want, 0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_rotary_and_cache_write_with_qk_norm(dtype, num_tokens, head_dim):
    _, q, k, v, (k_cache, v_cache), slots = _cache_case(
        num_tokens, 14, 2, head_dim, seed=31, dtype=dtype, device="cuda", num_blocks=40,
        block_size=16)
    cos, sin = _rope_tables(head_dim, max_position=4096, theta=1e6, device="cuda")
    g = torch.Generator().manual_seed(32)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to("cuda")
    want_k, want_v = k_cache.clone(), v_cache.clone()
    norms = (_norm_weight(head_dim, dtype=dtype, device="cuda"),
             _norm_weight(head_dim, seed=36, dtype=dtype, device="cuda"), 1e-6)
    want_q = rotary.rotary_and_write_kv_ref(q, k, v, positions, cos, sin, want_k, want_v,
                                            slots, norms)
    got_q = rotary.rotary_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slots,
                                       norms)
    tol = LOW_PRECISION[dtype]
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(k_cache, want_k, **tol)
    assert torch.equal(v_cache, want_v)
