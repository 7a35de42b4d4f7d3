"""Checks of M7's exercises: the GPTQ column update, packing codes into int32 words, the
quantization grid, the dequantization. Each test runs on its exercise's package (the
`stage` fixture). Tiny shapes only: the GPTQ reference here is the textbook loop in fp64
(the inverse Hessian itself, updated after each column), not the solver's Cholesky form."""

import math

import pytest
import torch

m71 = pytest.mark.exercise("m7.1")
m72 = pytest.mark.exercise("m7.2")
m73 = pytest.mark.exercise("m7.3")
m74 = pytest.mark.exercise("m7.4")


def gptq_module(stage):
    return stage("model_executor.layers.quantization.gptq")


# --- m7.1 the GPTQ column update -------------------------------------------------------

@m71
def test_inverse_hessian_factor_by_hand(stage):
    factor = stage("gptq_solver").inverse_hessian_factor
    u = factor(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(u, torch.tensor([[0.5, 0.0], [0.0, 1.0]]), atol=1e-6)
    # H = [[2, 1], [1, 2]]: H^-1 = [[2, -1], [-1, 2]] / 3 = U^T U with U upper
    u = factor(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    expected = torch.tensor([[math.sqrt(2 / 3), -math.sqrt(1 / 6)], [0.0, math.sqrt(1 / 2)]])
    assert torch.allclose(u, expected, atol=1e-6)


@m71
def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_inverse(stage):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 20, generator=g, dtype=torch.float64)
    h = x @ x.T / 20 + 0.1 * torch.eye(6, dtype=torch.float64)
    u = stage("gptq_solver").inverse_hessian_factor(h)
    assert torch.equal(u, torch.triu(u)) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), atol=1e-9)


@m71
def test_quantize_column_by_hand(stage):
    quantize_column = stage("gptq_solver").quantize_column
    block = torch.tensor([[0.26, 1.0, 2.0], [-0.4, 0.5, 0.0], [9.0, 1.0, 1.0]])
    scale, zero = torch.tensor([0.1, 0.2, 0.5]), torch.tensor([8.0, 8.0, 8.0])
    u_row = torch.tensor([0.5, 0.25, -1.0])
    codes, err = quantize_column(block, 0, u_row, scale, zero, 4)
    # 0.26 / 0.1 -> 3 (+8 = 11, 0.3); -0.4 / 0.2 -> -2 (6, exact); 9 / 0.5 = 18 -> 15 (3.5)
    assert codes.tolist() == [11.0, 6.0, 15.0]
    assert torch.allclose(err, torch.tensor([-0.04 / 0.5, 0.0, 5.5 / 0.5]), atol=1e-6)
    # the later columns take -err * u_row[1:] (what column 0 holds now is not read again)
    assert torch.allclose(block[:, 1:], torch.tensor([[1.02, 1.92], [0.5, 0.0],
                                                      [1.0 - 11.0 * 0.25, 1.0 + 11.0]]),
                          atol=1e-5)


@m71
def test_quantize_column_touches_only_the_later_columns(stage):
    quantize_column = stage("gptq_solver").quantize_column
    block = torch.tensor([[0.33, 0.33, 0.33, 0.33]])
    scale, zero = torch.tensor([0.1]), torch.tensor([8.0])
    u_row = torch.tensor([9.0, 2.0, 0.5, 4.0])
    codes, err = quantize_column(block, 2, u_row, scale, zero, 4)
    assert codes.tolist() == [11.0] and torch.allclose(err, torch.tensor([0.06]), atol=1e-6)
    assert torch.allclose(block[:, 3], torch.tensor([0.33 - 0.24]), atol=1e-6)
    codes, err = quantize_column(block, 3, u_row, scale, zero, 4)  # the last column
    assert codes.tolist() == [9.0] and block.shape == (1, 4)


def grid(w, sym):
    """The asymmetric / symmetric 4-bit grid of each row (as fit_grid documents it)."""
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.full_like(scale, 8) if sym else torch.round(-lo / scale).clamp(1, 15)
    return scale, zero


def obs_reference(weight, hessian, rows, sym, damp=0.01):
    """GPTQ as first written (OBS, one column at a time, fp64): the inverse Hessian H^-1
    itself, the column's error spread by its row, then its row and column eliminated."""
    w, h = weight.double().clone(), hessian.double().clone()
    h += torch.eye(len(h), dtype=h.dtype) * damp * h.diagonal().mean()
    hinv = torch.linalg.inv(h)
    codes, scales = torch.zeros_like(w), []
    for j in range(w.shape[1]):
        if j % rows == 0:
            scale, zero = grid(w[:, j:j + rows], sym)
            scales.append(scale)
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 15)
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        codes[:, j] = q
    return codes, torch.stack(scales)


def correlated_layer(seed, out_features=6, in_features=16, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(in_features, 3, generator=g) @ torch.randn(3, n, generator=g)
    x += 0.1 * torch.randn(in_features, n, generator=g)  # inputs close to a 3-d subspace
    return torch.randn(out_features, in_features, generator=g), 2 * x @ x.T / n


@m71
@pytest.mark.parametrize("group_size, sym, block_size", [
    (8, False, 4), (-1, True, 16), (4, False, 8), (16, True, 5)])
def test_gptq_equals_the_textbook_loop(stage, group_size, sym, block_size):
    solver = stage("gptq_solver")
    config = gptq_module(stage).GPTQConfig(bits=4, group_size=group_size, sym=sym)
    for seed in (0, 1):
        weight, hessian = correlated_layer(seed)
        result = solver.gptq_quantize(weight, hessian, config, block_size=block_size)
        codes, scales = obs_reference(weight, hessian, 16 if group_size == -1 else group_size,
                                      sym)
        assert torch.equal(result.codes.double(), codes)
        assert torch.allclose(result.scales.double(), scales, atol=1e-5)


@m71
def test_gptq_beats_round_to_nearest_on_correlated_inputs(stage):
    solver = stage("gptq_solver")
    config = gptq_module(stage).GPTQConfig(bits=4, group_size=8, sym=False)
    for seed in (2, 3):
        weight, hessian = correlated_layer(seed)
        gptq = solver.gptq_quantize(weight, hessian, config, block_size=4).dequantize()
        rtn = solver.rtn_quantize(weight, config).dequantize()
        assert solver.output_error(weight, gptq, hessian) < \
            0.5 * solver.output_error(weight, rtn, hessian)


# --- m7.2 pack / unpack -------------------------------------------------------------------

def signed(word):
    return word - 2 ** 32 if word >= 2 ** 31 else word


@m72
def test_pack_puts_the_first_code_in_the_lowest_bits(stage):
    pack = stage("ops.gptq_pack").pack
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0, 15], [15] * 8]).T  # [8, 4]: along dim 0
    words = pack(codes, 4, dim=0)
    assert words.dtype == torch.int32 and words.shape == (1, 4)
    assert words[0].tolist() == [signed(0x87654321), 15, signed(0xF0000000), -1]
    assert pack(torch.tensor([[1, 2, 3, 4]]), 8, dim=1).tolist() == [[0x04030201]]
    assert pack(torch.tensor([[255, 0, 128, 1]]), 8, dim=1).tolist() == \
        [[0x018000FF]]


@m72
def test_pack_along_either_dim(stage):
    pack = stage("ops.gptq_pack").pack
    codes = torch.arange(32).reshape(2, 16) % 16  # rows 0..15 and again
    words = pack(codes, 4, dim=1)  # qzeros' layout: along the output dim
    assert words.shape == (2, 2) and words.is_contiguous()
    low, high = 0x76543210, signed(0xFEDCBA98)
    assert words.tolist() == [[low, high], [low, high]]
    words = pack(codes.T.contiguous(), 4, dim=0)  # qweight's: along the input dim
    assert words.shape == (2, 2) and words.is_contiguous()
    assert words.tolist() == [[low, low], [high, high]]


@m72
def test_unpack_reads_the_bits_back(stage):
    unpack = stage("ops.gptq_pack").unpack
    words = torch.tensor([[signed(0x87654321), -1]], dtype=torch.int32)
    codes = unpack(words, 4, dim=0)
    assert codes.dtype == torch.int32 and codes.shape == (8, 2)
    assert codes[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and codes[:, 1].tolist() == [15] * 8
    assert unpack(words, 4, dim=1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8] + [15] * 8]
    assert unpack(torch.tensor([[signed(0x80FF0102)]], dtype=torch.int32), 8, dim=1).tolist() \
        == [[2, 1, 255, 128]]


@m72
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_then_unpack_is_the_identity(stage, bits, dim):
    ops = stage("ops.gptq_pack")
    g = torch.Generator().manual_seed(bits + dim)
    shape = [5, 5]
    shape[dim] = 32 // bits * 3
    codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.int32)
    codes.view(-1)[:2] = torch.tensor([0, 2 ** bits - 1], dtype=torch.int32)
    packed = ops.pack(codes, bits, dim)
    assert packed.shape[dim] == 3 and packed.shape[1 - dim] == 5
    assert torch.equal(ops.unpack(packed, bits, dim), codes)


@m72
def test_pack_refuses_what_does_not_fit(stage):
    pack = stage("ops.gptq_pack").pack
    with pytest.raises(ValueError):
        pack(torch.zeros(6, 2, dtype=torch.int32), 4, dim=0)  # 6 codes: not a whole word
    with pytest.raises(ValueError):
        pack(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4, dim=1)
    with pytest.raises(ValueError):
        pack(torch.tensor([[0, -1, 0, 0]]), 8, dim=1)
    assert pack(torch.tensor([[255, 0, 0, 0]]), 8, dim=1).tolist() == [[255]]


# --- m7.3 the grid --------------------------------------------------------------------------

@m73
def test_asymmetric_grid_by_hand(stage):
    gq = gptq_module(stage)
    w = torch.tensor([[-1.0, 0.45, 2.0], [-3.0, -1.42, -0.13], [0.3, 1.5, 0.7]])
    scale, zero = gq.fit_grid(w, 4, sym=False)
    # row 0: range [-1, 2] -> s = 3/15, z = 1/0.2 = 5; row 1: [-3, 0] -> 0.2, 15;
    # row 2: [0, 1.5] -> 0.1, z = 0 clamped to 1 (v1 stores z - 1: z = 0 cannot be written)
    assert torch.allclose(scale, torch.tensor([0.2, 0.2, 0.1]), atol=1e-6)
    assert zero.tolist() == [5.0, 15.0, 1.0]
    codes = gq.to_codes(w, scale, zero, 4)
    assert codes.tolist() == [[0.0, 7.0, 15.0], [0.0, 8.0, 14.0], [4.0, 15.0, 8.0]]
    back = gq.from_codes(codes, scale, zero)
    assert torch.allclose(back, torch.tensor([[-1.0, 0.4, 2.0], [-3.0, -1.4, -0.2],
                                              [0.3, 1.4, 0.7]]), atol=1e-5)


@m73
def test_symmetric_grid_by_hand(stage):
    gq = gptq_module(stage)
    w = torch.tensor([[-0.62, 1.5, 0.0], [-2.9, 0.9, 3.0]])
    scale, zero = gq.fit_grid(w, 4, sym=True)
    # row 0: max |w| = 1.5 -> s = 3/15 = 0.2; row 1: 3 -> 0.4; z = 8 always
    assert torch.allclose(scale, torch.tensor([0.2, 0.4]), atol=1e-6)
    assert zero.tolist() == [8.0, 8.0]
    codes = gq.to_codes(w, scale, zero, 4)
    # +max|w| is 7.5 steps up: the top code 15 stands for 7 steps (one short)
    assert codes.tolist() == [[5.0, 15.0, 8.0], [1.0, 10.0, 15.0]]
    assert torch.allclose(gq.from_codes(codes, scale, zero),
                          torch.tensor([[-0.6, 1.4, 0.0], [-2.8, 0.8, 2.8]]), atol=1e-5)


@m73
def test_grid_edge_cases(stage):
    gq = gptq_module(stage)
    zeros_row = torch.zeros(1, 4)
    for sym, z in [(False, 1.0), (True, 8.0)]:
        scale, zero = gq.fit_grid(zeros_row, 4, sym)
        assert scale.tolist() == [1.0] and zero.tolist() == [z]
        assert gq.from_codes(gq.to_codes(zeros_row, scale, zero, 4), scale, zero).tolist() == \
            [[0.0] * 4]
    scale, zero = gq.fit_grid(torch.tensor([[-2.56, 0.0, 2.54]]), 8, sym=False)
    assert torch.allclose(scale, torch.tensor([0.02]), atol=1e-7) and zero.tolist() == [128.0]
    scale, zero = gq.fit_grid(torch.tensor([[-1.0, 1.0]]), 8, sym=True)
    assert torch.allclose(scale, torch.tensor([2 / 255])) and zero.tolist() == [128.0]
    codes = gq.to_codes(torch.tensor([[-9.0, 9.0, 0.29]]), torch.tensor([0.1]),
                        torch.tensor([3.0]), 8)  # clamped to [0, 255]
    assert codes.tolist() == [[0.0, 93.0, 6.0]]


# --- m7.4 dequantize ------------------------------------------------------------------------

def words(codes_along, bits=4):
    """One int32 word per list of 32 / bits codes, the first in the lowest bits."""
    return signed(sum(c << (bits * k) for k, c in enumerate(codes_along)))


@m74
def test_dequantize_by_hand(stage):
    dequantize = stage("ops.gptq_pack").dequantize
    # in = 8 rows, out = 8 columns, one group; column o holds codes o, o+1, ... (mod 16)
    codes = [[(i + o) % 16 for o in range(8)] for i in range(8)]  # [in, out]
    qweight = torch.tensor([[words([codes[i][o] for i in range(8)]) for o in range(8)]],
                           dtype=torch.int32)
    stored = [7, 7, 0, 1, 2, 3, 14, 13]  # stored zero of each output column
    qzeros = torch.tensor([[words(stored)]], dtype=torch.int32)
    scales = torch.tensor([[0.5, 1.0, 2.0, 0.25, 1.0, 1.0, 0.5, 0.125]])
    g_idx = torch.zeros(8, dtype=torch.int32)
    for offset in (1, 0):  # v1 stores z - 1; v2 stores z
        w = dequantize(qweight, qzeros, scales, g_idx, 4, zero_offset=offset)
        expected = torch.tensor([[(codes[i][o] - stored[o] - offset) * scales[0, o].item()
                                  for o in range(8)] for i in range(8)])
        assert w.shape == (8, 8) and torch.equal(w, expected)
    assert dequantize(qweight, qzeros, scales, g_idx, 4)[0, 0].item() == -4.0  # (0 - 8) * .5


@m74
def test_dequantize_rows_use_their_g_idx_group(stage):
    dequantize = stage("ops.gptq_pack").dequantize
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 16), generator=g)  # [in, out]
    zeros = torch.randint(1, 16, (3, 16), generator=g)  # z per group, stored z - 1 (v1)
    scales = torch.rand(3, 16, generator=g, dtype=torch.float32) + 0.1
    g_idx = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 0, 2, 1, 1, 2, 0], dtype=torch.int32)
    qweight = torch.tensor([[words(codes[8 * b:8 * b + 8, o].tolist()) for o in range(16)]
                            for b in range(2)], dtype=torch.int32)  # [in / 8, out]
    qzeros = torch.tensor([[words((zeros[grp, 8 * b:8 * b + 8] - 1).tolist()) for b in range(2)]
                           for grp in range(3)], dtype=torch.int32)  # [groups, out / 8]
    w = dequantize(qweight, qzeros, scales, g_idx, 4)
    expected = torch.empty(16, 16)
    for i in range(16):
        grp = int(g_idx[i])
        expected[i] = (codes[i] - zeros[grp]).float() * scales[grp]
    assert w.dtype == torch.float32 and torch.allclose(w, expected)
    half = dequantize(qweight, qzeros, scales.half(), g_idx, 4)
    expected = torch.stack([(codes[i] - zeros[int(g_idx[i])]).float()
                            * scales.half().float()[int(g_idx[i])] for i in range(16)])
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), expected, rtol=1e-3, atol=1e-3)


@m74
def test_dequantize_8_bits(stage):
    dequantize = stage("ops.gptq_pack").dequantize
    qweight = torch.tensor([[words([0, 255, 128, 127], bits=8)]], dtype=torch.int32)  # [1, 1]
    qzeros = torch.tensor([[words([127, 0, 0, 0], bits=8)]], dtype=torch.int32)  # out = 4
    scales = torch.tensor([[0.5, 1.0, 1.0, 1.0]])
    w = dequantize(qweight[:, :1].expand(1, 4).contiguous(), qzeros, scales,
                   torch.zeros(4, dtype=torch.int32), 8)
    assert w[:, 0].tolist() == [-64.0, 63.5, 0.0, -0.5]  # (q - 128) * 0.5
    assert w[:, 1].tolist() == [-1.0, 254.0, 127.0, 126.0]  # stored 0: z = 1
