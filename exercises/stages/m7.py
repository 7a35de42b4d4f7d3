"""M7 · GPTQ: the column-by-column rounding that spreads each error over the rest, the
int4 codes packed into int32 words, the quantization grid, and the dequantization."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m7.1", "GPTQ: round a column, spread its error on the rest",
        ("gptq_solver.py::inverse_hessian_factor", "gptq_solver.py::quantize_column"),
        "hard",
        "GPTQ rounds a layer's weight one input column at a time and moves each column's "
        "rounding error onto the columns not rounded yet, weighted by the inverse Hessian, "
        "so that the layer's output on real inputs changes the least.",
        "inverse_hessian_factor: lower Cholesky of H, torch.cholesky_inverse of it (H^-1),\n"
        "then its upper Cholesky factor U (torch.linalg.cholesky(..., upper=True)).\n"
        "quantize_column: codes = to_codes(column j); err = (w - from_codes(codes)) / u_row[j];\n"
        "block[:, j+1:] -= err[:, None] * u_row[j+1:]. Return (codes, err), both [out]."),
    Exercise(
        "m7.2", "pack int4 codes into int32 words, and unpack",
        ("ops/gptq_pack.py::pack", "ops/gptq_pack.py::unpack"),
        "medium",
        "A 4-bit weight is only smaller if it is stored in 4 bits: eight codes share an "
        "int32 word, in the bit layout every GPTQ checkpoint and the kernels agree on.",
        "32 // bits codes per word along dim, code k of a word in bits [k*bits, (k+1)*bits).\n"
        "pack: ValueError if dim's size is not a multiple of that or a code is outside\n"
        "[0, 2^bits); shift and sum in int64, then as a signed int32 (>= 2^31: minus 2^32).\n"
        "unpack: the word & 0xFFFFFFFF, shifted right by k*bits, & (2^bits - 1); int32."),
    Exercise(
        "m7.3", "the quantization grid: scale, zero point, codes",
        ("model_executor/layers/quantization/gptq.py::fit_grid",
         "model_executor/layers/quantization/gptq.py::to_codes",
         "model_executor/layers/quantization/gptq.py::from_codes"),
        "medium",
        "Each group of weights is rounded to 2^bits evenly spaced values, w ~ (q - z) * s; "
        "the grid must cover the group's range and hold 0 exactly, and the format limits "
        "where its zero point may lie.",
        "fit_grid, per row: lo = min(row, 0), hi = max(row, 0); sym: hi = max(-lo, hi), lo = -hi\n"
        "scale = (hi - lo) / (2^bits - 1) (1 where it is 0); zero = 2^(bits-1) if sym, else\n"
        "round(-lo / scale) clamped to [1, 2^bits - 1]. to_codes: round(w / s) + z, clamped to\n"
        "[0, 2^bits - 1]; from_codes: (q - z) * s (scale and zero broadcast per row)."),
    Exercise(
        "m7.4", "dequantize a checkpoint: (q - z) * s per group",
        ("ops/gptq_pack.py::dequantize",),
        "easy",
        "What a GPTQ checkpoint stands for: every kernel and the CPU path are checked "
        "against this one torch reference, so its reading of zeros and groups is the "
        "format's.",
        "codes = unpack(qweight) along dim 0 ([in, out]); zeros = unpack(qzeros) along dim 1\n"
        "plus zero_offset ([groups, out]); row i uses group g_idx[i]: its zeros and scales.\n"
        "Return (codes - zeros[g]) in the scales' dtype, times scales[g]."),
]
