"""M7's W4A16 / W8A16 Triton matmul (`ops/gptq_gemm.py`) against its torch reference.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1) in fp32 on
tiny shapes: M in {1, 3, 17, 40}, K in {64, 128, 256}, N in {32, 48, 96} (M and N not
multiples of the tiles), 4 and 8 bits, groups of 32 and 64 rows and one group per
column, each through the four paths (gemv for one row: K split, the last program of a
column tile adding the splits, or a second kernel; decode: tensor-core tiles with K
split and summed by a second kernel; prefill: one program per output tile; dequant: the
weight written out, then a dense matmul) and both ways of unpacking the words; zero
points of format v1 and v2. The kernels' conversion (a code ORed into the bits of the
fp32 2^23, minus 2^23 + z) is checked exactly for every code against every zero. The
reference itself is checked against the checkpoint format's own dequantization
(`gptq.rtn_layer` + `dequantize`), and `GPTQLinear` through the kernel against its CPU
path (act-order too), after `.to()` casts and a state_dict round trip. The benchmark tool (tools/bench_gptq_kernels.py) runs end to end on small shapes
(--interpret-smoke), and its tables on made-up timings.

The `gpu` tests (skipped without CUDA) run the compiled kernels in bf16 at the linear
shapes of qwen2.5-0.5b, through every path, and replayed from a CUDA graph, and at
llama-3.1-8b's: `python3 -m pytest -q -m gpu tests/test_gptq_kernels.py`.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from conftest import stages_with  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = stages_with("gptq")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

# Launch settings for the CPU tests: small tiles, and decode's split of K forced (with
# fill this high every K-step is its own split; the interpreter pretends to have 4 SMs).
DECODE = dict(path="decode", block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1,
              fill=64)
PREFILL = dict(path="prefill", block_m=32, block_n=32, block_k=64, num_warps=4, num_stages=1,
               fill=0)
# one row: split K as much as it goes, the last program of a column tile adding the splits
GEMV = dict(path="gemv", block_n=32, block_k=32, num_warps=4, num_stages=1, fill=64,
            last_adds=True)
DEQUANT = dict(path="dequant", block_n=32, num_warps=4)
CONFIGS = {"gemv": GEMV, "decode": DECODE, "prefill": PREFILL, "dequant": DEQUANT}
# (M, K, N, bits, group_size): every M, K, N, bits and group size at least twice
CASES = [(1, 64, 32, 4, 32), (1, 256, 96, 8, 64), (3, 128, 48, 4, 128),
         (3, 64, 96, 8, 32), (17, 256, 48, 4, 64), (17, 128, 32, 8, 128),
         (40, 128, 96, 4, 32), (40, 256, 32, 8, 256)]


def _modules(stage):
    """The stage's kernel module and its GPTQ format module."""
    return (importlib.import_module(f"{stage}.ops.gptq_gemm"),
            importlib.import_module(f"{stage}.model_executor.layers.quantization.gptq"))


def _random_layer(gptq, k, n, bits, group_size, dtype=torch.float32, device=DEVICE, seed=0,
                  m=1):
    """x [m, k] and a random layer as the kernel reads it: codes packed along K, scales
    around 0.02 (a weight's size), zero points anywhere in [1, 2^bits] packed along N
    minus one (format v1). Also the codes and zero points unpacked, as floats."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 2 ** bits, (k, n), generator=g)
    scales = 0.02 * (0.5 + torch.rand(groups, n, generator=g))
    zeros = torch.randint(1, 2 ** bits + 1, (groups, n), generator=g)
    x = torch.randn(m, k, generator=g)

    def to(t):
        return t.to(device=device, dtype=dtype)

    return (to(x), gptq.pack(codes, bits, dim=0).to(device), to(scales),
            gptq.pack(zeros - 1, bits, dim=1).to(device), (codes.float(), zeros.float()))


def _dense_weight(unpacked, scales, group_size):
    """W [K, N] in fp32, (q - z) * s written out row by row, independent of the module."""
    codes, zeros = unpacked
    rows = torch.arange(codes.shape[0]) // group_size
    return (codes - zeros[rows]) * scales.float().cpu()[rows]


def _assert_close_fp32(got, want):
    """fp32 against fp32: only the order of the additions differs."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.abs().max().item()
    assert scale > 0  # a zero output would match anything
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("path", ["gemv", "decode", "prefill", "dequant"])
@pytest.mark.parametrize("m, k, n, bits, group_size", CASES)
def test_kernel_matches_the_reference(stage, path, m, k, n, bits, group_size):
    ops, gptq = _modules(stage)
    x, qweight, scales, zeros, unpacked = _random_layer(gptq, k, n, bits, group_size, m=m,
                                                     seed=m * k + n + bits)
    config = dict(CONFIGS[path])
    if path == "gemv" and m > 1:  # one row only
        with pytest.raises(ValueError, match="one row"):
            ops.gptq_matmul(x, qweight, scales, zeros, group_size, bits, **config)
        return
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(x) \
        if (m + k + bits) % 3 else None  # a bias in two of three cases
    config["bias"] = bias
    want = x.cpu() @ _dense_weight(unpacked, scales, group_size)
    want = want if bias is None else want + bias.cpu()
    plan = ops.launch_plan(m, n, k, group_size, ops.num_sms(x.device), bits,
                           **{key: v for key, v in config.items() if key != "bias"})
    if path in ("decode", "gemv"):  # K split, every step its own split
        assert plan["splits"] == k // plan["block_k"] > 1
    elif path == "prefill":
        assert plan["splits"] == 1
    _assert_close_fp32(ops.gptq_matmul_ref(x, qweight, scales, zeros, group_size, bits, bias),
                       want)
    if path in ("decode", "prefill"):  # both ways of cutting codes out of the words
        config["words_once"] = (m + k + bits + (path == "decode")) % 2 == 0
    got = ops.gptq_matmul(x, qweight, scales, zeros, group_size, bits, **config)
    _assert_close_fp32(got, want)
    if path == "gemv":  # every column tile's counter back at zero for the next call
        assert not ops.split_counters(x.device).any()
        config["last_adds"] = False  # the splits added by a second kernel instead
        _assert_close_fp32(ops.gptq_matmul(x, qweight, scales, zeros, group_size, bits,
                                           **config), want)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("path, bits", [("gemv", 8), ("decode", 8), ("prefill", 4),
                                        ("dequant", 4)])
def test_v2_zero_points_are_read_as_stored(stage, path, bits):
    """zero_offset=0 (format gptq_v2): the stored zero points are z itself, 0 (which v1
    cannot store) and 2^bits - 1 included; every path agrees with the reference and
    with W written out, with a bias; gemv and decode with K not split (fill 0: the cases
    above split)."""
    ops, gptq = _modules(stage)
    m = 1 if path == "gemv" else 3
    k, n, group_size = 128, 64, 32
    x, qweight, scales, _, (codes, _) = _random_layer(gptq, k, n, bits, group_size, m=m,
                                                      seed=7 + bits)
    zeros = torch.randint(0, 2 ** bits, (k // group_size, n),
                          generator=torch.Generator().manual_seed(8))
    zeros[0, :8] = 0  # a group with no negative weights
    zeros[1, :8] = 2 ** bits - 1  # and one with no positive weights
    qzeros = gptq.pack(zeros, bits, dim=1).to(qweight.device)
    bias = 0.1 * x[0, :n]
    want = x.cpu() @ _dense_weight((codes, zeros.float()), scales, group_size) + bias.cpu()
    _assert_close_fp32(ops.gptq_matmul_ref(x, qweight, scales, qzeros, group_size, bits,
                                           bias, zero_offset=0), want)
    config = dict(CONFIGS[path], **({"fill": 0} if "fill" in CONFIGS[path] else {}))
    assert ops.launch_plan(m, n, k, group_size, ops.num_sms(x.device), bits,
                           **config)["splits"] == 1
    got = ops.gptq_matmul(x, qweight, scales, qzeros, group_size, bits, bias, zero_offset=0,
                          **config)
    _assert_close_fp32(got, want)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bits", [4, 8])
def test_every_code_minus_every_zero_is_exact(stage, bits):
    """The kernels turn a code q into the fp32 2^23 + q (q ORed into the bits of 2^23) and
    subtract 2^23 + z made the same way from the stored zero plus the format's offset:
    q - z, exactly. One group of 2^bits rows (every code) by 2^bits columns (every
    storable zero), written out by the dequant kernel: v1 (z = stored + 1) with scales of
    1, which is q - z itself, and v2 with random scales; both equal to the torch
    dequantization, bit for bit."""
    ops, gptq = _modules(stage)
    top = 2 ** bits
    codes = torch.arange(top)[:, None].expand(top, top)  # row k holds code k
    stored = torch.arange(top).flip(0)[None, :]  # column j stores top - 1 - j
    qweight = gptq.pack(codes, bits, dim=0).to(DEVICE)
    qzeros = gptq.pack(stored, bits, dim=1).to(DEVICE)
    g_idx = torch.zeros(top, dtype=torch.int32, device=DEVICE)
    # all columns in one tile: few programs under the interpreter
    plan = ops.launch_plan(top, top, top, top, ops.num_sms(qweight.device), bits,
                           path="dequant", block_n=top)
    random_scales = torch.rand(1, top, generator=torch.Generator().manual_seed(bits))
    for scales, offset in ((torch.ones(1, top), 1), (random_scales, 0)):
        scales = scales.to(DEVICE)
        got = ops.dequantize_weight(qweight, scales, qzeros, top, bits, plan,
                                    zero_offset=offset)
        assert torch.equal(got, gptq.dequantize(qweight, qzeros, scales, g_idx, bits, offset))
        if offset == 1:  # scales of 1: q - z itself
            assert torch.equal(got.cpu(), (codes - stored - offset).float())


@pytest.mark.parametrize("stage", STAGES)
def test_default_launch_picks_the_path_by_rows(stage):
    ops, gptq = _modules(stage)
    assert ops.default_config(1)["path"] == "gemv"
    assert ops.default_config(2)["path"] == ops.default_config(ops.DECODE_MAX_M)["path"] \
        == "decode"
    assert ops.default_config(ops.DEQUANT_MIN_M)["path"] == "dequant"
    if ops.DEQUANT_MIN_M > ops.DECODE_MAX_M + 1:
        assert ops.default_config(ops.DECODE_MAX_M + 1)["path"] == "prefill"
    for m in (1, 3, 17):
        x, qweight, scales, zeros, unpacked = _random_layer(gptq, 128, 48, 4, 64, m=m, seed=m)
        got = ops.gptq_matmul(x, qweight, scales, zeros, 64, 4)
        _assert_close_fp32(got, x.cpu() @ _dense_weight(unpacked, scales, 64))
        again = ops.gptq_matmul(x, qweight, scales, zeros, 64, 4)
        assert torch.equal(got, again)  # the split sums add in a fixed order


@pytest.mark.parametrize("stage", STAGES)
def test_launch_plan_fills_an_h100_at_one_row(stage):
    """At M = 2 the decode plan for every qwen2.5-0.5b linear (group 64) gives at least
    100 programs (an H100 has 132 SMs; k_proj 56), and at M = 1 the gemv plan (except
    k_proj, N = 128: one tile of columns and 14 K-steps); splits are never empty and
    cover K exactly."""
    ops, _ = _modules(stage)
    for k, n in [(896, 896), (896, 128), (896, 4864), (4864, 896)]:
        gemv = ops.launch_plan(1, n, k, 64, 132, 4, **ops.GPU_CONFIGS["gemv"])
        tiles_n, splits = gemv["grid"]
        assert tiles_n * splits >= (14 if n == 128 else 132), (k, n, gemv)
        assert (splits - 1) * gemv["k_per_split"] < k <= splits * gemv["k_per_split"]
        plan = ops.launch_plan(2, n, k, 64, 132, **ops.GPU_CONFIGS["decode"])
        tiles_n, tiles_m, splits = plan["grid"]
        # k_proj: 8 tiles of 16 columns x every K-step its own split
        assert tiles_n * tiles_m * splits >= (56 if n == 128 else 100), (k, n, plan)
        block_k = plan["block_k"]
        assert tiles_n * plan["block_n"] >= n and k % block_k == 0
        assert 64 % block_k == 0 or block_k % 64 == 0
        assert (splits - 1) * plan["k_per_split"] < k <= splits * plan["k_per_split"]
        assert plan["k_per_split"] % plan["block_k"] == 0
    # a big grid is not split; fill 0 never splits
    assert ops.launch_plan(4096, 4864, 896, 64, 132, **ops.GPU_CONFIGS["prefill"])["splits"] == 1
    assert ops.launch_plan(2, 128, 896, 64, 132, fill=0)["splits"] == 1
    assert ops.split_k(output_tiles=4, k_steps=10, fill=2, sms=4) == (2, 5)
    assert ops.split_k(output_tiles=1, k_steps=7, fill=2, sms=132) == (7, 1)
    assert ops.fitting_block_k(128, 896, 896) == 128 and ops.fitting_block_k(128, 48, 96) == 16
    assert ops.fitting_block_k(256, 64, 896) == 128  # whole groups, and 896 = 7 x 128
    assert ops.fitting_block_k(256, 64, 4864) == 256


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("block_k, fill", [(32, 1), (64, 1), (64, 0)])
def test_k_steps_over_several_groups_and_an_uneven_last_split(stage, block_k, fill):
    """K = 448 in groups of 32 = 14 groups: a K-step of 64 covers 2 groups (their scales
    and zeros broadcast), and with K split in 4 (a pretend GPU of 4 SMs, fill 1) the
    last split is shorter than the others (7 or 14 steps) and must stop at K."""
    ops, gptq = _modules(stage)
    x, qweight, scales, zeros, unpacked = _random_layer(gptq, 448, 32, 4, 32, m=2, seed=5)
    config = dict(DECODE, block_k=block_k, fill=fill)
    plan = ops.launch_plan(2, 32, 448, 32, ops.num_sms(x.device), **config)
    assert plan["block_k"] == block_k
    if fill:
        assert plan["splits"] > 1 and plan["splits"] * plan["k_per_split"] > 448
    got = ops.gptq_matmul(x, qweight, scales, zeros, 32, 4, **config)
    _assert_close_fp32(got, x.cpu() @ _dense_weight(unpacked, scales, 32))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, -1)])
def test_reference_matches_the_checkpoint_dequantization(stage, bits, group_size):
    """gptq_matmul_ref on a round-to-nearest checkpoint of a random weight equals x @ the
    format's own `dequantize`, and is close to x @ the weight it was quantized from."""
    ops, gptq = _modules(stage)
    g = torch.Generator().manual_seed(bits)
    k, n = 128, 48
    weight = 0.05 * torch.randn(n, k, generator=g)  # [out, in], like nn.Linear's
    ckpt = gptq.rtn_layer(weight, gptq.GPTQConfig(bits=bits, group_size=group_size))
    rows = k if group_size == -1 else group_size
    scales = ckpt["scales"].float()
    x = torch.randn(5, k, generator=g)
    got = ops.gptq_matmul_ref(x, ckpt["qweight"], scales, ckpt["qzeros"], rows, bits)
    dequantized = gptq.dequantize(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"].float(),
                                  ckpt["g_idx"], bits)
    _assert_close_fp32(got, x @ dequantized)
    exact = x @ weight.t()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < (0.2 if bits == 4 else 0.02), rel  # quantization error, not garbage (~1.4)


def _act_order_checkpoint(gptq, weight, config, seed=0):
    """A checkpoint whose groups are not consecutive rows (desc_act): the weight's input
    rows quantized in a shuffled order, then stored in their own order with g_idx
    naming each row's group."""
    k = weight.shape[1]
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    ckpt = gptq.rtn_layer(weight[:, order], config)
    back = torch.argsort(order)  # row i of the weight is row back[i] of the shuffled one
    codes = gptq.unpack(ckpt["qweight"], config.bits, dim=0)[back]
    ckpt["qweight"] = gptq.pack(codes, config.bits, dim=0)
    ckpt["g_idx"] = ckpt["g_idx"][back].contiguous()
    return ckpt


def _filled_layer(gptq, ckpt, config, bias, k, n):
    layer = gptq.GPTQLinear(k, n, bias=True, config=config, dtype=torch.float32)
    for name in ("qweight", "qzeros", "g_idx"):
        getattr(layer, name).data = ckpt[name].clone()
    layer.scales.data = ckpt["scales"].float()
    layer.bias.data = bias.clone()
    return layer


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_linear_kernel_path_after_to_and_a_state_dict_round_trip(stage, desc_act):
    """GPTQLinear's CPU path (the dequantized weight) and its kernel path (on the GPU, or
    here under the interpreter; one row: gemv, four: decode) both equal x @ the
    checkpoint's dequantized weight + bias, act-order too. So does the kernel path after
    `.half().float()` (the packed tensors are int32: not cast), and in a new layer that
    loads the layer's state_dict, which holds the
    checkpoint's tensors as they were loaded (act-order rows back in the checkpoint's
    order). load_state_dict drops what prepare() made of the old tensors: a forward
    before the next prepare() fails."""
    _, gptq = _modules(stage)
    config = gptq.GPTQConfig(bits=4, group_size=32, desc_act=desc_act)
    k, n = 128, 64
    g = torch.Generator().manual_seed(3)
    weight = 0.05 * torch.randn(n, k, generator=g)
    ckpt = (_act_order_checkpoint(gptq, weight, config) if desc_act
            else gptq.rtn_layer(weight, config))
    bias = (0.1 * torch.randn(n, generator=g)).half().float()  # exact in fp16, as scales
    x = torch.randn(2, 2, k, generator=g)  # 4 rows
    want = x @ gptq.dequantize(ckpt["qweight"], ckpt["qzeros"], ckpt["scales"].float(),
                               ckpt["g_idx"], 4) + bias
    layer = _filled_layer(gptq, ckpt, config, bias, k, n)
    layer.prepare()
    assert (layer.input_perm is not None) == desc_act
    cpu_path = layer(x)
    _assert_close_fp32(cpu_path, want)
    rel = ((cpu_path - (x @ weight.t() + bias)).norm() / cpu_path.norm()).item()
    assert rel < 0.2, rel  # quantization error, not garbage

    def kernel_path(layer, *inputs):
        layer.weight = None  # forward now calls the kernel (on the GPU, where it goes)
        layer.to(DEVICE)
        for rows, expected in inputs:
            _assert_close_fp32(layer(rows.to(DEVICE)), expected)

    one_row = (x[0, :1], want[0, :1])
    kernel_path(layer, one_row, (x, want))
    zeros = layer.qzeros.clone()
    layer.half()
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.qzeros, zeros)
    kernel_path(layer.float(), (x, want))
    state = layer.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    for name in ("qweight", "qzeros", "g_idx"):
        assert torch.equal(state[name].cpu(), ckpt[name])
    empty = {name: torch.zeros_like(t) for name, t in ckpt.items()}
    again = _filled_layer(gptq, empty, config, torch.zeros(n), k, n)
    again.load_state_dict(state)
    again.prepare()
    kernel_path(again, one_row)
    layer.load_state_dict(state)
    assert not layer.prepared and layer.input_perm is None
    with pytest.raises(RuntimeError, match="call prepare"):
        layer(x.to(DEVICE))
    layer.prepare()
    kernel_path(layer, (x, want))


@pytest.mark.parametrize("stage", STAGES)
def test_bad_inputs_are_refused(stage):
    ops, gptq = _modules(stage)
    x, qweight, scales, zeros, _ = _random_layer(gptq, 128, 32, 4, 64, m=2)
    call = ops.gptq_matmul
    ok = (x, qweight, scales, zeros, 64, 4)
    assert call(*ok).shape == (2, 32)
    bad = [  # (arguments, the start of the error message)
        ((x, qweight, scales, zeros, 64, 3), "bits"),
        ((x, qweight, scales, zeros, 64, 4, torch.zeros(31).to(x)), "bias"),
        ((x[None], qweight, scales, zeros, 64, 4), "x must be 2-D"),
        ((x.t().contiguous().t(), qweight, scales, zeros, 64, 4), "x must"),  # strided rows
        ((x.to(torch.float64), qweight, scales, zeros, 64, 4), "x must"),
        ((x, qweight[:-1], scales, zeros, 64, 4), "qweight"),  # K rows do not match
        ((x, qweight.to(torch.int64), scales, zeros, 64, 4), "qweight"),
        ((x, qweight, scales, zeros, 64, 8), "qweight"),  # packed for 4 bits, not 8
        ((x, qweight[:, :28].contiguous(), scales[:, :28].contiguous(), zeros, 64, 4),
         "qweight"),  # N = 28: not whole words of zero points
        ((x, qweight, scales.half(), zeros, 64, 4), "scales"),
        ((x, qweight, scales[:, :16], zeros, 64, 4), "scales"),
        ((x, qweight, scales, zeros[:1], 64, 4), "qzeros"),
        ((x, qweight, scales, zeros.float(), 64, 4), "qzeros"),  # unpacked, as floats
        ((x, qweight, scales, zeros, 32, 4), "group_size"),  # 4 groups of 32, not 2
        ((x, qweight, scales[:1].repeat(16, 1), zeros[:1].repeat(16, 1), 8, 4),
         "group_size"),  # 16 groups of 8: smaller than a tl.dot tile
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=f"^gptq_matmul: {message}"):
            call(*args)
    no_rows = torch.zeros(0, 128, dtype=x.dtype, device=x.device)
    assert call(no_rows, *ok[1:]).shape == (0, 32)
    for bias in (torch.zeros(31).to(x), torch.zeros(32, dtype=torch.float64)):
        with pytest.raises(ValueError, match="^gptq_matmul: bias"):
            call(*ok, bias)


# -- the benchmark tool, on made-up numbers -------------------------------------------
def _load_bench_tool():
    spec = importlib.util.spec_from_file_location("bench_gptq_kernels",
                                                  REPO / "tools" / "bench_gptq_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench_tool(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FOLOVLLM_GIT_COMMIT="abc123", FOLOVLLM_GIT_DIRTY="0")
    return subprocess.run([sys.executable, "tools/bench_gptq_kernels.py", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_bench_tool_help_and_refusal(tmp_path):
    proc = _run_bench_tool("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("--out", "--sweep", "--stage", "--interpret-smoke", "--shapes",
                 "llama-3.1-8b"):
        assert word in proc.stdout
    assert _run_bench_tool("--rows", "0,x").returncode == 2
    proc = _run_bench_tool("--shapes", "qwen2.5-0.5b,llama-9b", "--interpret-smoke")
    assert proc.returncode == 2 and "--shapes: choose from" in proc.stderr
    if not torch.cuda.is_available():
        out = tmp_path / "g.json"
        proc = _run_bench_tool("--out", str(out))
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
        assert not out.exists()


def test_bench_tool_interpret_smoke_writes_the_json(tmp_path):
    """The whole tool on small shapes under the interpreter, both models' shape sets:
    checks, (meaningless) timings, sweep, tables, JSON with its provenance."""
    out = tmp_path / "g.json"
    proc = _run_bench_tool("--interpret-smoke", "--sweep", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "meaningless" in proc.stdout and "| layer (7 linears)" in proc.stdout
    assert "| layer (4 linears)" in proc.stdout and "| llama-3.1-8b | 1 |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["git_commit"] == "abc123" and data["git_dirty"] is False
    assert "--interpret-smoke" in data["command"] and data["timings_meaningful"] is False
    assert list(data["shape_sets"]) == ["qwen2.5-0.5b", "llama-3.1-8b"]
    shapes = [r for r in data["rows"] if r["kind"] == "shape"]
    assert {r["plan"]["path"] for r in shapes} == {"gemv", "dequant"}
    assert {r["model"] for r in shapes} == {"qwen2.5-0.5b", "llama-3.1-8b"}
    assert all(r["ok"] and r["max_abs_err"] < 1e-4 and r["gptq_us"] > 0 for r in shapes)
    layers = [r for r in data["rows"] if r["kind"] == "layer"]
    assert [(r["model"], r["linears"]) for r in layers if r["m"] == 1] == [
        ("qwen2.5-0.5b", 7), ("llama-3.1-8b", 4)]
    assert len(layers) == 4 and all(r["gptq_gbps"] > 0 for r in layers)
    sweep = [r for r in data["rows"] if r["kind"] == "sweep"]
    assert sweep and all(r["error"] is None and r["us"] > 0 for r in sweep)


def test_bench_tool_writes_the_table_and_json(tmp_path):
    tool = _load_bench_tool()
    rows = []
    for model, (_, shapes) in tool.SHAPE_SETS.items():
        for m in (1, 64):
            for name, k, n, count in shapes:
                torch_us, gptq_us = 10.0 + k * n / 1e5, 4.0 + k * n / 4e5
                rows.append(tool.shape_row(model, m, name, k, n, count, torch_us, gptq_us,
                                           max_abs_err=1e-3, tolerance=2e-2,
                                           plan={"path": "decode", "grid": (1, 1, 2)}))
    layers = tool.layer_rows(rows)
    assert [(r["model"], r["m"]) for r in layers] == [
        ("qwen2.5-0.5b", 1), ("qwen2.5-0.5b", 64), ("llama-3.1-8b", 1), ("llama-3.1-8b", 64)]
    mine = [r for r in rows if r["m"] == 1 and r["model"] == "llama-3.1-8b"]
    want = sum(r["count"] * r["torch_us"] for r in mine)
    assert layers[2]["torch_us"] == pytest.approx(want)
    assert layers[2]["ratio"] == pytest.approx(layers[2]["torch_us"] / layers[2]["gptq_us"])
    # the layer's bytes over its time: 2 bytes a weight in bf16; 4 bits + per group of 64
    # a bf16 scale and a 4-bit zero point
    weights = sum(r["k"] * r["n"] for r in mine)
    assert layers[2]["torch_gbps"] == pytest.approx(2 * weights / want / 1e3)
    assert layers[2]["gptq_gbps"] == pytest.approx(
        (weights / 2 + weights / 64 * 2.5) / layers[2]["gptq_us"] / 1e3)
    sweep = [tool.sweep_row("llama-3.1-8b", 1, "o_proj", 4096, 4096, 1, {"block_n": 64},
                            3.0, {"grid": (1,)}),
             tool.sweep_row("llama-3.1-8b", 1, "o_proj", 4096, 4096, 1, {"fill": 0}, None,
                            {}, error="boom")]
    out = tmp_path / "r.json"
    text = tool.write_results(out, {"command": "x", "git_commit": "abc"}, rows + layers + sweep)
    data = json.loads(out.read_text())
    assert data["git_commit"] == "abc" and len(data["rows"]) == len(rows) + 6
    lines = text.splitlines()
    assert lines[0] == "qwen2.5-0.5b:" and lines[2].startswith("| M ")
    assert set(lines[3]) <= set("|-: ") and "llama-3.1-8b:" in lines
    assert sum(line.count("| layer (7 linears)") for line in lines) == 2
    assert sum(line.count("| layer (4 linears)") for line in lines) == 2
    sums = lines[lines.index("layer sums:") + 4:]  # after the blank line and the header
    assert [line.split(" | ")[:2] for line in sums[:4]] == [
        ["| qwen2.5-0.5b", "1"], ["| llama-3.1-8b", "1"], ["| qwen2.5-0.5b", "64"],
        ["| llama-3.1-8b", "64"]]
    assert all(r["ok"] for r in rows) and not tool.shape_row(
        "m", 1, "q", 8, 8, 1, 1.0, 1.0, max_abs_err=1.0, tolerance=0.1, plan={})["ok"]
    assert "boom" in tool.sweep_table(sweep)
    assert tool.parse_shapes("llama-3.1-8b, qwen2.5-0.5b") == ["llama-3.1-8b", "qwen2.5-0.5b"]
    with pytest.raises(ValueError, match="--shapes"):
        tool.parse_shapes("")
    assert tool.default_out_path("NVIDIA H100 80GB HBM3").name.startswith("gptq-kernels-h100-")


# -- on the GPU ------------------------------------------------------------------------
QWEN_SHAPES = [(896, 896), (896, 128), (896, 4864), (4864, 896)]  # (K, N) of its linears
# llama-3.1-8b's linears as the engine runs them: q/k/v merged, o, gate/up merged, down
LLAMA_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def _assert_close_bf16(got, want):
    """bf16 against the fp32 reference on the same inputs: W and the output are rounded
    to bf16 (8 bits of mantissa), the sum is fp32 in both."""
    scale = want.float().abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("k, n", QWEN_SHAPES)
def test_gpu_bf16_matches_the_reference(stage, k, n):
    ops, gptq = _modules(stage)
    for m in (1, 5, 16, 17, 64, 256):
        for bits, group_size in ((4, 64), (4, 128), (8, k)):
            x, qweight, scales, zeros, _ = _random_layer(
                gptq, k, n, bits, group_size, dtype=torch.bfloat16, device="cuda", m=m,
                seed=m + bits)
            want = ops.gptq_matmul_ref(x, qweight, scales, zeros, group_size, bits)
            for config in ({}, {"fill": 0}):
                got = ops.gptq_matmul(x, qweight, scales, zeros, group_size, bits, **config)
                assert got.dtype == torch.bfloat16
                _assert_close_bf16(got, want)
        # every path at other sizes too
        for path, m in (("decode", 64), ("prefill", 1), ("prefill", 256), ("dequant", 1),
                        ("gemv", 1), ("decode", 1)):
            x, qweight, scales, zeros, _ = _random_layer(
                gptq, k, n, 4, 64, dtype=torch.bfloat16, device="cuda", m=m)
            want = ops.gptq_matmul_ref(x, qweight, scales, zeros, 64, 4)
            for _ in range(3):  # the gemv path's counters start from zero every call
                got = ops.gptq_matmul(x, qweight, scales, zeros, 64, 4, path=path,
                                      **ops.GPU_CONFIGS[path])
                _assert_close_bf16(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("m", [1, 2, 16, 64])
def test_gpu_cuda_graph_replay(stage, m):
    """Captured once, replayed on new inputs in the same buffer: the eager result."""
    ops, gptq = _modules(stage)
    k, n = 4864, 896
    x, qweight, scales, zeros, _ = _random_layer(gptq, k, n, 4, 64, dtype=torch.bfloat16,
                                                 device="cuda", m=m)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        ops.gptq_matmul(x, qweight, scales, zeros, 64, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.gptq_matmul(x, qweight, scales, zeros, 64, 4)
    for seed in (1, 2):
        x.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        want = ops.gptq_matmul(x, qweight, scales, zeros, 64, 4)
        assert torch.equal(out, want)
        _assert_close_bf16(out, ops.gptq_matmul_ref(x, qweight, scales, zeros, 64, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("k, n", LLAMA_SHAPES)
def test_gpu_bf16_at_llama_8b_shapes(stage, k, n):
    """The kernels at the shapes the benchmark's 8B table times: one row (gemv), 16
    (decode) and 64 (dequant), groups of 64 and 128."""
    ops, gptq = _modules(stage)
    for group_size in (64, 128):
        x, qweight, scales, zeros, _ = _random_layer(gptq, k, n, 4, group_size,
                                                     dtype=torch.bfloat16, device="cuda",
                                                     m=64, seed=group_size)
        for m in (1, 16, 64):
            want = ops.gptq_matmul_ref(x[:m], qweight, scales, zeros, group_size, 4)
            got = ops.gptq_matmul(x[:m], qweight, scales, zeros, group_size, 4)
            _assert_close_bf16(got, want)
