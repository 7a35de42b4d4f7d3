"""The GPTQ quantizer (M7): the solver, the calibration text, the CLI and the perplexity eval.

The solver is checked on small random problems against what GPTQ is defined to do: its
output error ||(W - Q) X||² is below round-to-nearest's when the inputs are correlated;
with uncorrelated inputs (a diagonal Hessian) and no dampening there is nothing to
compensate and it *is* round-to-nearest; one column's update is the closed-form OBS
update; the lazy block updates change nothing but the order of the arithmetic; act-order
writes a valid g_idx. The CLI runs end to end on tiny dummy models (in process, so the
standard library's text is gathered once), and the engine loads what it writes.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO_ROOT, load_stage, model_runner, prefill_logits, stages_with

STAGES = stages_with("gptq")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def solver(stage):
    return load_stage(f"{stage}.gptq_solver")


def gptq_format(stage):
    return load_stage(f"{stage}.model_executor.layers.quantization.gptq")


def problem(correlated: bool, out=32, inn=128, n=1024, seed=0):
    """A weight [out, in] and H = 2 X Xᵀ / n, plus X; correlated inputs mix a few factors."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen)
    if correlated:
        x = torch.randn(inn, 16, generator=gen) @ torch.randn(16, n, generator=gen) \
            + 0.1 * torch.randn(inn, n, generator=gen)
    else:
        x = torch.randn(inn, n, generator=gen)
    return w, 2 * x @ x.t() / n, x


def checkpoint_layout(stage, model) -> dict:
    """The model's tensors by the checkpoint's names (q/k/v and gate/up are merged layers
    in the engine: their parts are slices of them)."""
    return load_stage(f"{stage}.model_executor.model_loader").checkpoint_layout(model)


def config(stage, **kw):
    return gptq_format(stage).GPTQConfig(**{**dict(bits=4, group_size=32), **kw})


def true_error(w, q, x):
    return float(((w - q) @ x).pow(2).sum() / (w @ x).pow(2).sum())


# --- the solver -------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(stage, sym, desc_act):
    s = solver(stage)
    w, h, x = problem(correlated=True)
    cfg = config(stage, sym=sym, desc_act=desc_act)
    gptq, rtn = s.gptq_quantize(w, h, cfg), s.rtn_quantize(w, cfg)
    gptq_err, rtn_err = true_error(w, gptq.dequantize(), x), true_error(w, rtn.dequantize(), x)
    assert gptq_err < 0.75 * rtn_err, (gptq_err, rtn_err)
    # output_error computes the same ratio from H alone
    assert s.output_error(w, gptq.dequantize(), h) == pytest.approx(gptq_err, rel=1e-4)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sym", [True, False])
def test_with_uncorrelated_inputs_and_no_dampening_gptq_is_round_to_nearest(stage, sym):
    """A diagonal H: no column's error can be compensated by another, so nothing moves."""
    s = solver(stage)
    w, _, _ = problem(correlated=False)
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)
    cfg = config(stage, sym=sym, damp_percent=0.0)
    gptq, rtn = s.gptq_quantize(w, h, cfg), s.rtn_quantize(w, cfg)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.allclose(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_solver_rtn_packs_to_the_format_modules_rtn_layer(stage, sym, group_size):
    """The CLI's RTN (the solver's) and the engine's `rtn_layer` write the same tensors."""
    s, g = solver(stage), gptq_format(stage)
    w, _, _ = problem(correlated=False)
    cfg = config(stage, sym=sym, group_size=group_size)
    q = s.rtn_quantize(w, cfg)
    ours, theirs = g.pack_layer(q.codes, q.scales, q.zeros, q.g_idx, 4), g.rtn_layer(w, cfg)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("stage", STAGES)
def test_one_column_update_is_the_closed_form_obs_update(stage):
    """After quantizing column 0: w_rest -= (w0 - q0) / [H⁻¹]_00 * [H⁻¹]_0,rest."""
    s, g = solver(stage), gptq_format(stage)
    w, h, _ = problem(correlated=True, inn=16)
    h = h + 0.01 * h.diagonal().mean() * torch.eye(16)
    h_inv = torch.linalg.inv(h.double())
    scale, zero = g.fit_grid(w, 4, True)
    block = w.clone()
    codes, _ = s.quantize_column(block, 0, s.inverse_hessian_factor(h)[0], scale, zero, 4)
    q0 = g.from_codes(codes[:, None], scale, zero)[:, 0]
    expected = w[:, 1:].double() - ((w[:, 0] - q0).double() / h_inv[0, 0])[:, None] \
        * h_inv[0, 1:][None, :]
    assert torch.allclose(block[:, 1:].double(), expected, atol=1e-4)
    assert not torch.allclose(block[:, 1:], w[:, 1:])  # the update did move them


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("group_size", [32, 48, -1])  # 48: groups straddle blocks of 128
def test_lazy_block_updates_give_the_same_codes_as_column_by_column(stage, group_size):
    s = solver(stage)
    w, h, _ = problem(correlated=True, inn=192)
    cfg = config(stage, group_size=group_size, desc_act=True)
    blocked, one_by_one = s.gptq_quantize(w, h, cfg), s.gptq_quantize(w, h, cfg, block_size=1)
    assert torch.equal(blocked.codes, one_by_one.codes)
    assert torch.allclose(blocked.scales, one_by_one.scales, rtol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_act_order_g_idx_groups_columns_by_decreasing_hessian_diagonal(stage):
    s = solver(stage)
    w, h, _ = problem(correlated=True)
    q = s.gptq_quantize(w, h, config(stage, desc_act=True))
    order = torch.argsort(h.diagonal(), descending=True)
    assert torch.equal(q.g_idx[order].long(), torch.arange(128) // 32)
    assert torch.bincount(q.g_idx.long()).tolist() == [32] * 4
    assert not torch.equal(q.g_idx.long(), torch.arange(128) // 32)  # not the plain order


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_solver_output_packs_and_runs_in_the_engine_layer(stage, desc_act, bits):
    """pack_layer -> GPTQLinear (act-order rows reordered by prepare) computes x Qᵀ."""
    s, g = solver(stage), gptq_format(stage)
    w, h, _ = problem(correlated=True)
    cfg = config(stage, bits=bits, desc_act=desc_act, sym=False)
    q = s.gptq_quantize(w, h, cfg)
    packed = g.pack_layer(q.codes, q.scales, q.zeros, q.g_idx, bits)
    assert torch.equal(g.unpack(packed["qweight"], bits, dim=0), q.codes.t().to(torch.int32))
    layer = g.GPTQLinear(128, 32, False, cfg, torch.float32)
    for name, tensor in packed.items():
        getattr(layer, name).data.copy_(tensor)
    layer.prepare()
    x = torch.randn(5, 128)
    scales16 = q.scales.half().float()  # what the checkpoint keeps
    expected = x @ ((q.codes - q.zeros.t()[:, q.g_idx.long()])
                    * scales16.t()[:, q.g_idx.long()]).t()
    assert torch.allclose(layer(x), expected, atol=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_dead_inputs_get_a_zero_weight_and_no_nan(stage):
    s = solver(stage)
    w, h, _ = problem(correlated=True)
    h[:, 5] = 0
    h[5, :] = 0
    q = s.gptq_quantize(w, h, config(stage, sym=True))
    deq = q.dequantize()
    assert torch.isfinite(deq).all() and torch.all(deq[:, 5] == 0)


# --- the calibration text -----------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_calibration_split_is_disjoint_by_package_nonempty_and_fixed(stage):
    cal = load_stage(f"{stage}.calibration")
    halves = {split: cal.module_texts(split) for split in cal.SPLITS}
    packages = {split: {name.split(".")[0] for name, _ in texts}
                for split, texts in halves.items()}
    assert packages["calibration"] and packages["heldout"]
    assert not packages["calibration"] & packages["heldout"]
    for split, texts in halves.items():
        assert len(cal.stdlib_text(split)) > 200_000  # enough for many windows
        assert [n for n, _ in texts] == sorted(n for n, _ in texts)
        assert all(cal.split_of(n) == split for n, _ in texts)
    skipped = {"antigravity", "this", "idlelib", "tkinter", "test"}
    assert not skipped & (packages["calibration"] | packages["heldout"])
    # The same split in a process with another string-hash seed (no use of hash()); the
    # module is loaded on its own (it needs only the standard library: no torch to import).
    listing = json.dumps([(n, cal.split_of(n)) for n, _ in cal.stdlib_modules()])
    code = ("import importlib.util, json, sys; "
            "spec = importlib.util.spec_from_file_location('cal', sys.argv[1]); "
            "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c); "
            "print(json.dumps([(n, c.split_of(n)) for n, _ in c.stdlib_modules()]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code, cal.__file__], env=env,
                           capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == listing, other.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_token_windows_are_evenly_spaced_and_refuse_short_text(stage):
    cal = load_stage(f"{stage}.calibration")
    ids = list(range(100))
    windows = cal.token_windows(ids, 3, 10)
    assert windows == [ids[0:10], ids[40:50], ids[90:100]]
    with pytest.raises(ValueError, match="fewer than"):
        cal.token_windows(ids, 11, 10)


# --- the CLI end to end -------------------------------------------------------------------

def quantize(stage, *args):
    """`python -m STAGE.quantize ARGS` in this process: its exit status."""
    try:
        return load_stage(f"{stage}.quantize").main([*args, "--no-progress"])
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def read_folder(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


RUNS = {  # model, method, extra flags
    "rtn-llama": ("dummy:tiny-llama", "rtn", []),
    "gptq-qwen2-act-asym": ("dummy:tiny-qwen2", "gptq", ["--desc-act", "--asym"]),
    "gptq-qwen3-8bit": ("dummy:tiny-qwen3", "gptq", ["--bits", "8", "--group-size", "32"]),
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("run", list(RUNS))
def test_cli_writes_a_checkpoint_the_engine_runs(stage, run, tmp_path):
    model, method, flags = RUNS[run]
    out = tmp_path / "q"
    assert quantize(stage, "--model", model, "--method", method, "--out", str(out),
                    "--num-samples", "8", "--seq-len", "64", *flags) == 0
    g, m = gptq_format(stage), load_stage(stage)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = g.GPTQConfig.from_dict(cfg)
    assert qc == g.GPTQConfig.from_dict(json.loads((out / "quantize_config.json").read_text()))
    assert (qc.bits, qc.desc_act, qc.sym) == ("--bits" in flags and 8 or 4,
                                              "--desc-act" in flags, "--asym" not in flags)
    tensors = read_folder(out)
    fp = m.LLM(model, device="cpu")
    fp_model = model_runner(fp).model
    fp_params = checkpoint_layout(stage, fp_model)  # by the checkpoint's names
    log = json.loads((out / "quantize_log.json").read_text())
    assert len(log["layers"]) == fp_model.config.num_hidden_layers
    # where it came from: the command that runs it again, the commit, machine, versions
    assert log["command"] == shlex.join(["python", "-m", f"{stage}.quantize", "--model", model,
                                         "--method", method, "--out", str(out),
                                         "--num-samples", "8", "--seq-len", "64", *flags,
                                         "--no-progress"])
    assert re.fullmatch(r"[0-9a-f]{40}", log["git_commit"]) and isinstance(log["git_dirty"], bool)
    assert log["machine"]["cpu_count"] and log["versions"]["torch"] == torch.__version__
    for i, layer in enumerate(fp_model.model.layers):
        for name in LINEARS:
            check_layer(g, qc, tensors, f"model.layers.{i}.{name}",
                        fp_params[f"model.layers.{i}.{name}.weight"], method)
            assert 0 < log["layers"][i]["errors"][name] < 0.05
    for name, param in fp_params.items():  # everything else as it was
        if not name.endswith(tuple(f"{lin}.weight" for lin in LINEARS)):
            assert torch.equal(tensors[name], param.data), name
    check_engine_runs_the_folder(m, fp, out, tensors, qc)


def check_layer(g, qc, tensors, prefix, weight, method):
    out_f, in_f = weight.shape
    groups, pf = in_f // qc.group_size, 32 // qc.bits
    t = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert t["qweight"].shape == (in_f // pf, out_f) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, out_f // pf) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (groups, out_f) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (in_f,) and t["g_idx"].dtype == torch.int32
    assert torch.bincount(t["g_idx"].long()).tolist() == [qc.group_size] * groups
    deq = g.dequantize(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], qc.bits).t()
    step = t["scales"].float()[t["g_idx"].long()].t()  # each weight's quantization step
    if method == "rtn":
        assert ((deq - weight).abs() <= 0.51 * step).all()  # fp16 scales: a hair over
    else:  # GPTQ moves weights to compensate: close, not within half a step
        assert ((deq - weight).abs() <= 4 * step).all()


def check_engine_runs_the_folder(m, fp, out, tensors, qc):
    """LLM(model=out) gives the same logits as the dummy model whose linears hold the
    checkpoint's dequantized weights, and generates."""
    g = load_stage(f"{type(fp).__module__.split('.')[0]}.model_executor.layers."
                   "quantization.gptq")
    stage = type(fp).__module__.split(".")[0]
    with torch.no_grad():
        for name, weight in checkpoint_layout(stage, model_runner(fp).model).items():
            name = name.removesuffix(".weight")
            if name.endswith(LINEARS):  # the part of a merged layer's weight, in place
                t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
                weight.copy_(g.dequantize(t["qweight"], t["qzeros"], t["scales"].float(),
                                          t["g_idx"], qc.bits).t())
    with pytest.warns(UserWarning, match="no tokenizer files"):
        quantized = m.LLM(str(out), device="cpu")
    prompt = [5, 77, 300, 12, 9, 401]
    assert torch.allclose(prefill_logits(quantized, prompt), prefill_logits(fp, prompt),
                          atol=1e-4)
    text = quantized.generate("Hello", m.SamplingParams(max_tokens=4, ignore_eos=True),
                              use_tqdm=False)[0]
    assert len(text.token_ids) == 4


@pytest.mark.parametrize("stage", STAGES)
def test_gptq_log_compares_with_rtn_on_the_same_inputs(stage, tmp_path):
    """On a model that has seen text (the tiny one's inputs are correlated enough), GPTQ's
    output error is below RTN's on most linears, both measured on the same inputs."""
    assert quantize(stage, "--model", "dummy:tiny-llama", "--out", str(tmp_path / "q"),
                    "--num-samples", "8", "--seq-len", "64") == 0
    log = json.loads((tmp_path / "q" / "quantize_log.json").read_text())
    pairs = [(layer["errors"][n], layer["rtn_errors"][n]) for layer in log["layers"]
             for n in LINEARS]
    assert sum(g < r for g, r in pairs) >= 0.8 * len(pairs), pairs
    # the perplexity results record how the checkpoint was made, from this log
    ev, out = load_stage(f"{stage}.eval_ppl"), tmp_path / "ppl.json"
    with pytest.warns(UserWarning, match="no tokenizer files"):
        assert ev.main(["--model", "dummy:tiny-llama", "--model", str(tmp_path / "q"),
                        "--max-tokens", "64", "--seq-len", "32", "--device", "cpu",
                        "--no-progress", "--out", str(out)]) == 0
    base, checkpoint = json.loads(out.read_text())["results"]
    assert base["checkpoint"] is None
    assert checkpoint["checkpoint"] == {k: v for k, v in log.items() if k != "layers"}
    assert checkpoint["checkpoint"]["command"].startswith(f"python -m {stage}.quantize ")
    assert checkpoint["checkpoint"]["git_commit"]


@pytest.mark.parametrize("stage", STAGES)
def test_true_sequential_quantizes_each_linear_from_the_quantized_ones_before(stage, tmp_path):
    """--true-sequential: q/k/v see the same inputs either way (nothing before them in the
    layer); each later linear's Hessian comes from a pass in which the linears before it
    are already quantized, so its codes differ from the one-pass quantization's; the log
    says which was used, and the engine runs the checkpoint."""
    common = ["--model", "dummy:tiny-llama", "--num-samples", "8", "--seq-len", "64"]
    assert quantize(stage, *common, "--out", str(tmp_path / "one")) == 0
    assert quantize(stage, *common, "--true-sequential", "--out", str(tmp_path / "seq")) == 0
    one, seq = read_folder(tmp_path / "one"), read_folder(tmp_path / "seq")
    layer0 = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(one[f"{layer0}{name}.qweight"], seq[f"{layer0}{name}.qweight"])
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.equal(one[f"{layer0}{name}.qweight"], seq[f"{layer0}{name}.qweight"])
    logs = [json.loads((tmp_path / d / "quantize_log.json").read_text()) for d in ("one", "seq")]
    assert [log["true_sequential"] for log in logs] == [False, True]
    assert "--true-sequential" in logs[1]["command"]
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = load_stage(stage).LLM(str(tmp_path / "seq"), device="cpu")
    params = load_stage(f"{stage}.sampling_params").SamplingParams(temperature=0, max_tokens=4)
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("args, message", [
    (["--group-size", "48"], "group"),  # 64-wide layers
    (["--seq-len", "100000"], "max_position_embeddings"),
    (["--model", "dummy:nope"], "unknown dummy model"),
    (["--calibration-file", "/nonexistent.txt"], "cannot read"),
    (["--damp-percent", "1.5"], "damp"),
    (["--bits", "3"], "--bits"),  # argparse's own error, status 2 as well
])
def test_bad_input_is_refused_with_status_2(stage, args, message, tmp_path, capsys):
    base = ["--model", "dummy:tiny-llama", "--out", str(tmp_path / "q"), "--num-samples", "2"]
    assert quantize(stage, *base, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_cli_refuses_a_non_empty_out_from_the_shell(stage, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", f"{stage}.quantize", "--model",
                             "dummy:tiny-llama", "--out", str(tmp_path)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--force" in result.stderr, result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


# --- perplexity through the engine ------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_perplexity_through_the_engine_matches_the_logits(stage):
    ev, m = load_stage(f"{stage}.eval_ppl"), load_stage(stage)
    result = ev.perplexity("dummy:tiny-llama", 3, 32, device="cpu", progress=False)
    assert result["tokens"] == 3 * 31 and result["windows"] == 3
    llm = m.LLM("dummy:tiny-llama", device="cpu")
    cal = load_stage(f"{stage}.calibration")
    nll = []
    for window in cal.get_windows(llm.tokenizer, 3, 32, split="heldout"):
        logp = torch.log_softmax(prefill_logits(llm, window), dim=-1)
        nll += [-logp[i, window[i + 1]].item() for i in range(len(window) - 1)]
    expected = torch.tensor(nll).mean().exp().item()
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
