"""The GPTQ checkpoint format (M7), from its definition, and loading it into the engine.

No GPTQ library can be installed here (auto-gptq is end-of-life and needs CUDA libraries;
transformers 5 reads GPTQ only through gptqmodel), so the format is checked against what
it is defined to be: 32 / bits codes per int32 along the input dimension, lowest bits
first; zero points packed along the output dimension and stored minus one (format v1);
fp16 scales per group; g_idx naming each input row's group. A checkpoint is built here by
hand from a tiny transformers model (round to nearest, no quantizer involved), loaded by
the engine, and its greedy tokens compared with transformers running the dequantized
weights: the loader, the act-order reordering and the CPU path together.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from conftest import hf_greedy, load_stage, make_tiny_hf_model, stages_with

hf_logging.set_verbosity_error()

STAGES = stages_with("gptq")
PROMPTS = [[5, 77, 300], [(i * 37 + 11) % 512 for i in range(20)]]
NUM_TOKENS = 12


def gptq_module(stage: str):
    return load_stage(f"{stage}.model_executor.layers.quantization.gptq")


# --- packing, by hand ---------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_a_2x16_weight_packs_bit_by_bit(stage):
    """Codes of a 2 x 16 weight ([in=16, out=2] as stored): column 0 counts 0..15, column
    1 is 15, 0, 15, 0, ...: two int32 words per column, the first row in the lowest bits."""
    g = gptq_module(stage)
    codes = torch.stack([torch.arange(16), torch.tensor([15, 0] * 8)], dim=1)  # [in, out]
    packed = g.pack(codes, bits=4, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    as_unsigned = (packed.to(torch.int64) & 0xFFFFFFFF).tolist()
    assert as_unsigned == [[0x76543210, 0x0F0F0F0F], [0xFEDCBA98, 0x0F0F0F0F]]
    assert packed[1, 0].item() == 0xFEDCBA98 - 2 ** 32  # int32: the top bit is the sign
    assert torch.equal(g.unpack(packed, bits=4, dim=0), codes.to(torch.int32))


@pytest.mark.parametrize("stage", STAGES)
def test_8_bit_codes_and_zeros_pack_along_their_own_dimension(stage):
    g = gptq_module(stage)
    codes = torch.tensor([[1, 2, 3, 250]])  # one group's zeros for 4 output channels
    packed = g.pack(codes, bits=8, dim=1)
    assert packed.shape == (1, 1)
    assert packed.item() & 0xFFFFFFFF == 0xFA030201


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(stage, bits, dim):
    g = gptq_module(stage)
    gen = torch.Generator().manual_seed(bits * 10 + dim)
    shape = (32, 24) if dim == 0 else (24, 32)
    codes = torch.randint(0, 2 ** bits, shape, generator=gen)
    packed = g.pack(codes, bits, dim)
    assert packed.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(g.unpack(packed, bits, dim), codes.to(torch.int32))


@pytest.mark.parametrize("stage", STAGES)
def test_pack_refuses_codes_off_the_grid_and_ragged_rows(stage):
    g = gptq_module(stage)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        g.pack(torch.full((8, 1), 16), 4, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        g.pack(torch.zeros(12, 1, dtype=torch.int64), 4, 0)


@pytest.mark.parametrize("stage", STAGES)
def test_dequantize_is_codes_minus_stored_zero_plus_one_times_scale(stage):
    g = gptq_module(stage)
    codes = torch.randint(0, 16, (16, 8))  # [in, out]
    stored_zeros = torch.randint(0, 15, (2, 8))  # two groups of 8 rows
    scales = torch.rand(2, 8) + 0.5
    g_idx = torch.tensor([0, 1] * 8)  # rows alternate between the groups
    w = g.dequantize(g.pack(codes, 4, 0), g.pack(stored_zeros, 4, 1), scales, g_idx, 4)
    for i in range(16):
        expected = (codes[i] - (stored_zeros[g_idx[i]] + 1)) * scales[g_idx[i]]
        assert torch.allclose(w[i], expected.float())


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sym", [True, False])
def test_round_to_nearest_lands_within_half_a_step(stage, sym):
    g = gptq_module(stage)
    cfg = g.GPTQConfig(bits=4, group_size=32, sym=sym)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    t = g.rtn_layer(w, cfg)
    assert t["qweight"].shape == (8, 16) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 2) and t["scales"].shape == (2, 16)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].tolist() == [0] * 32 + [1] * 32
    zeros = g.unpack(t["qzeros"], 4, 1) + 1
    assert (zeros == 8).all() if sym else ((zeros >= 1) & (zeros <= 15)).all()
    deq = g.dequantize(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4).t()
    step = t["scales"].float()[t["g_idx"].long()].t()
    assert ((deq - w).abs() <= step / 2 + 1e-3).all()


# --- the config ----------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("cfg, message", [
    (dict(bits=3), "bits"), (dict(bits=2), "bits"), (dict(group_size=0), "group_size"),
    (dict(quant_method="awq"), "quant_method"), (dict(checkpoint_format="marlin"),
                                                 "checkpoint_format"),
    (dict(lm_head=True), "lm_head"), (dict(desc_act="yes"), "desc_act"),
])
def test_unsupported_settings_are_refused_by_name(stage, cfg, message):
    g = gptq_module(stage)
    with pytest.raises(ValueError, match=message):
        g.GPTQConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 64, **cfg})


@pytest.mark.parametrize("stage", STAGES)
def test_asking_for_gptq_on_a_full_precision_checkpoint_says_how_to_make_one(stage, tmp_path):
    folder, _ = save_hf(tmp_path, "llama")
    m = load_stage(stage)
    with pytest.raises(ValueError, match="quantization.*m7_gptq.quantize"):
        m.LLM(model=str(folder), device="cpu", quantization="gptq")
    with pytest.raises(ValueError, match="quantization"):
        m.EngineConfig(quantization="awq")


# --- a hand-made checkpoint through the engine ------------------------------------------

# name -> (bits, group_size, sym, act_order); act_order "shared": the linears that read
# one input (q/k/v, gate/up) share its order, as GPTQ tools write it (one Hessian); True:
# each linear its own order, which keeps the engine's merged layers in parts (GPTQParts).
LAYOUTS = {
    "4bit-g32-sym": (4, 32, True, False),
    "4bit-channel-asym": (4, -1, False, False),
    "8bit-g32-asym": (8, 32, False, False),
    "4bit-g32-act-order": (4, 32, True, "shared"),
    "4bit-g32-act-order-own": (4, 32, True, True),
}
# The linears a GPTQ checkpoint quantizes, by transformers' names (lm_head is not).
HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_by_hand(g, weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                     order: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round to nearest on a grid per group; the groups are the input rows in `order`
    (act-order: a random one), named by g_idx."""
    out_features, in_features = weight.shape
    rows = in_features if group_size == -1 else group_size
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[order] = torch.arange(in_features) // rows
    codes = torch.empty_like(weight)
    scales, zeros = [], []
    for group in range(in_features // rows):
        members = order[group * rows:(group + 1) * rows]
        scale, zero = g.fit_grid(weight[:, members], bits, sym)
        codes[:, members] = g.to_codes(weight[:, members], scale, zero, bits)
        scales.append(scale.half().float())  # the checkpoint keeps fp16 scales
        zeros.append(zero)
    return g.pack_layer(codes, torch.stack(scales), torch.stack(zeros), g_idx, bits)


def save_hf(tmp_path, model_type: str):
    hf_model = make_tiny_hf_model(model_type, seed=11)
    folder = tmp_path / f"{model_type}-fp"
    hf_model.save_pretrained(folder)
    return folder, hf_model


def make_gptq_checkpoint(g, hf_model, folder, layout: str, seed: int = 0,
                         fmt: str = "gptq", label: str | None = None,
                         zero_biases: bool = False):
    """Write a GPTQ folder from `hf_model`; put the dequantized weights into `hf_model`
    (what transformers then runs as the reference). `fmt` "gptq_v2" stores the zero
    points as they are (v1: minus one); `label` is the format the config claims (`fmt`
    unless given); `zero_biases` saves an all-zero bias for each linear without one (as
    old GPTQ tools did)."""
    bits, group_size, sym, act_order = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    tensors, orders = {}, {}
    for name, module in hf_model.named_modules():
        if name.rsplit(".", 1)[-1] not in HF_LINEARS:
            continue
        n = module.in_features
        order = torch.randperm(n, generator=gen) if act_order else torch.arange(n)
        if act_order == "shared":  # one order per (block, input size): q/k/v, gate/up
            order = orders.setdefault((name.rsplit(".", 1)[0], n), order)
        packed = quantize_by_hand(g, module.weight.data.float(), bits, group_size, sym, order)
        with torch.no_grad():
            module.weight.copy_(g.dequantize(packed["qweight"], packed["qzeros"],
                                             packed["scales"].float(), packed["g_idx"],
                                             bits).t())
        if fmt == "gptq_v2":  # the zero points themselves, not minus one
            packed["qzeros"] = g.pack(g.unpack(packed["qzeros"], bits, dim=1) + 1, bits, dim=1)
        tensors.update({f"{name}.{key}": value for key, value in packed.items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.data.clone()
        elif zero_biases:
            tensors[f"{name}.bias"] = torch.zeros(module.out_features)
    for name, tensor in hf_model.state_dict().items():
        if name.rsplit(".", 2)[-2] not in HF_LINEARS:
            tensors[name] = tensor.clone()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = g.GPTQConfig(bits=bits, group_size=group_size,
                                                 desc_act=bool(act_order), sym=sym,
                                                 checkpoint_format=label or fmt).to_dict()
    (folder / "config.json").write_text(json.dumps(config))


def make_llm(stage: str, folder, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer files")
        return load_stage(stage).LLM(model=str(folder), device="cpu", **kwargs)


def greedy(stage: str, llm, prompts=PROMPTS, n=NUM_TOKENS) -> list[list[int]]:
    params = load_stage(stage).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v with a bias
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_gptq_checkpoint_matches_transformers_on_its_dequantized_weights(
        stage, model_type, layout, tmp_path):
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model(model_type, seed=11)
    folder = tmp_path / "gptq"
    make_gptq_checkpoint(g, hf_model, folder, layout)
    llm = make_llm(stage, folder)
    assert llm.config.quantization == "gptq"  # found in config.json by itself
    model = llm.engine.model_runner.model
    layers = [m for m in model.modules() if isinstance(m, g.GPTQLinear)]
    act_order = LAYOUTS[layout][3]
    assert (layers[0].input_perm is not None) == bool(act_order)
    # q/k/v and gate/up are one GPTQ layer each when they share g_idx, else kept in parts
    parts = [m for m in model.modules() if isinstance(m, g.GPTQParts)]
    per_layer = dict(merged=2, apart=0, linears=4) if act_order is not True \
        else dict(merged=0, apart=2, linears=7)  # o_proj, down_proj, and 3 + 2 parts
    num_layers = hf_model.config.num_hidden_layers
    assert len(parts) == per_layer["apart"] * num_layers
    assert len(layers) == per_layer["linears"] * num_layers
    assert sum(m.shards is not None for m in layers) == per_layer["merged"] * num_layers
    expected = [hf_greedy(hf_model, ids, NUM_TOKENS) for ids in PROMPTS]
    assert greedy(stage, llm) == expected


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", ["4bit-g32-sym", "4bit-channel-asym", "8bit-g32-asym"])
def test_a_gptq_v2_checkpoint_matches_transformers(stage, layout, tmp_path):
    """checkpoint_format gptq_v2 stores the zero points as they are: read so, the same
    tokens as transformers on the dequantized weights."""
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("qwen2", seed=11)
    make_gptq_checkpoint(g, hf_model, tmp_path / "gptq", layout, fmt="gptq_v2")
    llm = make_llm(stage, tmp_path / "gptq")
    assert llm.config.quantization == "gptq"
    assert greedy(stage, llm) == [hf_greedy(hf_model, ids, NUM_TOKENS) for ids in PROMPTS]


@pytest.mark.parametrize("stage", STAGES)
def test_a_v2_checkpoint_labelled_v1_is_refused(stage, tmp_path):
    """Symmetric zeros stored as they are (8) under a v1 label would read as 9: every
    weight one step off. Refused, naming the likely cause."""
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("llama", seed=11)
    make_gptq_checkpoint(g, hf_model, tmp_path / "gptq", "4bit-g32-sym", fmt="gptq_v2",
                         label="gptq")
    with pytest.raises(ValueError, match="looks like a 'gptq_v2' checkpoint labelled v1"):
        make_llm(stage, tmp_path / "gptq")
    make_gptq_checkpoint(g, hf_model, tmp_path / "v1", "4bit-g32-sym")  # a true v1 loads
    assert greedy(stage, make_llm(stage, tmp_path / "v1"))


@pytest.mark.parametrize("stage", STAGES)
def test_all_zero_biases_of_old_checkpoints_load_as_no_bias(stage, tmp_path):
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("llama", seed=11)  # no biases
    folder = tmp_path / "gptq"
    make_gptq_checkpoint(g, hf_model, folder, "4bit-g32-sym", zero_biases=True)
    assert greedy(stage, make_llm(stage, folder)) == [hf_greedy(hf_model, ids, NUM_TOKENS)
                                                      for ids in PROMPTS]
    name = "model.layers.0.self_attn.q_proj.bias"  # a bias that is not zero: refused
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"does not use.*{name}"):
        make_llm(stage, folder)


@pytest.mark.parametrize("stage", STAGES)
def test_gptq_tensors_are_buffers(stage):
    """Not parameters (nothing to train): `.to()` moves and casts them like the model's
    own tensors, and `state_dict()` holds the checkpoint's tensors (not the CPU path's
    dequantized copy)."""
    g = gptq_module(stage)
    config = g.GPTQConfig(group_size=32)
    layer = g.GPTQLinear(64, 32, True, config, torch.float32)
    assert list(layer.parameters()) == []
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    for key, tensor in g.rtn_layer(torch.randn(32, 64), config).items():
        getattr(layer, key).copy_(tensor)
    layer.prepare()
    assert layer.weight is not None and "weight" not in layer.state_dict()
    half = layer.to(torch.float16)
    assert half.scales.dtype == torch.float16 and half.qweight.dtype == torch.int32


@pytest.mark.parametrize("stage", STAGES)
def test_quantize_config_json_alone_marks_a_gptq_folder(stage, tmp_path):
    """Older checkpoints carry `quantize_config.json` beside a config.json without
    `quantization_config`."""
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("llama", seed=11)
    folder = tmp_path / "gptq"
    make_gptq_checkpoint(g, hf_model, folder, "4bit-g32-sym")
    config = json.loads((folder / "config.json").read_text())
    (folder / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (folder / "config.json").write_text(json.dumps(config))
    llm = make_llm(stage, folder)
    assert llm.config.quantization == "gptq"
    assert greedy(stage, llm) == [hf_greedy(hf_model, ids, NUM_TOKENS) for ids in PROMPTS]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"].update(bits=3), "bits"),
    (lambda c: c["quantization_config"].update(checkpoint_format="marlin"), "checkpoint_format"),
    (lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method"),
    (lambda c: c["quantization_config"].update(group_size=16), "shape|group"),
])
def test_a_checkpoint_this_engine_cannot_run_is_refused(stage, edit, message, tmp_path):
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("llama", seed=11)
    folder = tmp_path / "gptq"
    make_gptq_checkpoint(g, hf_model, folder, "4bit-g32-sym")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        make_llm(stage, folder)


@pytest.mark.parametrize("stage", STAGES)
def test_unquantized_parts_stay_in_the_model_dtype(stage, tmp_path):
    g = gptq_module(stage)
    hf_model = make_tiny_hf_model("qwen2", seed=11)
    folder = tmp_path / "gptq"
    make_gptq_checkpoint(g, hf_model, folder, "4bit-g32-sym")
    model = make_llm(stage, folder, dtype="float16").engine.model_runner.model
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.lm_head.weight.dtype == torch.float16
    assert model.model.norm.weight.dtype == torch.float16
    qkv_proj = model.model.layers[0].self_attn.qkv_proj  # q/k/v merged, as one GPTQ layer
    assert isinstance(qkv_proj, g.GPTQLinear) and qkv_proj.qweight.dtype == torch.int32
    assert qkv_proj.scales.dtype == torch.float16 and qkv_proj.bias.dtype == torch.float16


@pytest.mark.parametrize("stage", STAGES)
def test_a_dummy_model_asked_for_gptq_gets_its_weights_rounded(stage):
    g = gptq_module(stage)
    m = load_stage(stage)
    full = m.LLM(model="dummy:tiny-qwen2", device="cpu").engine.model_runner.model
    quant = m.LLM(model="dummy:tiny-qwen2", device="cpu",
                  quantization="gptq").engine.model_runner.model
    qkv_proj = quant.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv_proj, g.GPTQLinear)
    assert (qkv_proj.config.bits, qkv_proj.config.group_size) == (4, 64)
    w = full.model.layers[1].self_attn.qkv_proj.weight
    step = qkv_proj.scales[qkv_proj.g_idx.long()].t()
    assert ((qkv_proj.weight - w).abs() <= step / 2 + 1e-4).all()
    assert torch.equal(qkv_proj.bias, full.model.layers[1].self_attn.qkv_proj.bias)
    assert torch.equal(quant.model.embed_tokens.weight, full.model.embed_tokens.weight)
