"""Model settings the engine must honour or refuse, and checkpoints that must fit the model.

A `config.json` setting that changes transformers' computation is either implemented
(checked here against transformers: greedy tokens, prefill logits, parameter count) or
refused with a ValueError naming it. A checkpoint tensor the model has no place for, or
one of the wrong shape, is refused by name instead of skipped or broadcast.
"""

import copy
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from conftest import (hf_greedy, hf_logits, load_stage, make_tiny_hf_model, prefill_logits,
                      stages_with)

hf_logging.set_verbosity_error()

LOGITS_ATOL = 1e-4
PROMPTS = [[5, 77, 300], [(i * 37 + 11) % 512 for i in range(20)]]
NUM_TOKENS = 12

# name -> (model_type, config overrides)
CASES = {
    "llama-attention-bias": ("llama", dict(attention_bias=True)),  # q/k/v/o bias
    "llama-mlp-bias": ("llama", dict(mlp_bias=True)),  # gate/up/down bias
    "qwen3-attention-bias": ("qwen3", dict(head_dim=32, attention_bias=True)),  # q/k/v/o bias
    # Every layer "sliding", but the window is as long as the model's limit: harmless.
    "qwen2-window-as-long-as-model": ("qwen2", dict(use_sliding_window=True, sliding_window=256,
                                                    max_window_layers=0)),
}


def make_llm(stage: str, folder):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer files")
        return load_stage(stage).LLM(model=str(folder), device="cpu")


def save_tiny(tmp_path_factory, name: str, model_type: str, **overrides):
    hf_model = make_tiny_hf_model(model_type, seed=7, **overrides)
    folder = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(folder)  # no tokenizer: the engine uses the byte stand-in
    return folder, hf_model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, folder, transformers model, reference greedy tokens) for one config."""
    model_type, overrides = CASES[request.param]
    folder, hf_model = save_tiny(tmp_path_factory, request.param, model_type, **overrides)
    expected = [hf_greedy(hf_model, ids, NUM_TOKENS) for ids in PROMPTS]
    return request.param, folder, hf_model, expected


def test_case_exercises_its_setting(case):
    """Each case really changes transformers' weights or attention, so parity means something."""
    name, _, hf_model, expected = case
    if "window" in name:
        assert set(hf_model.config.layer_types) == {"sliding_attention"}
        assert hf_model.config.sliding_window == hf_model.config.max_position_embeddings
        return
    flag = "mlp_bias" if "mlp" in name else "attention_bias"
    plain = copy.deepcopy(hf_model)
    biases = [p for n, p in plain.named_parameters() if n.endswith(".bias")]
    projs = {"mlp_bias": ("gate_proj", "up_proj", "down_proj"),
             "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")}[flag]
    assert len(biases) == len(projs) * hf_model.config.num_hidden_layers
    with torch.no_grad():
        for p in biases:
            p.zero_()
    diff = (hf_logits(plain, PROMPTS[1]) - hf_logits(hf_model, PROMPTS[1])).abs().max().item()
    assert diff > 0.1, f"{name}: the biases barely change the logits ({diff:.2e})"
    assert len({tuple(t) for t in expected}) == len(expected)


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_num_parameters_matches_transformers(stage, case):
    name, folder, hf_model, _ = case
    ModelConfig = load_stage(f"{stage}.config").ModelConfig
    mc = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    expected = sum(p.numel() for p in hf_model.parameters())
    assert mc.num_parameters() == expected, f"{stage}/{name}"


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_greedy_matches_transformers(stage, case):
    name, folder, _, expected = case
    llm = make_llm(stage, folder)
    params = load_stage(stage).SamplingParams(temperature=0, max_tokens=NUM_TOKENS,
                                              min_tokens=NUM_TOKENS)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for ids, out, ref in zip(PROMPTS, outputs, expected):
        assert out.token_ids == ref, f"{stage}/{name}: diverges on a {len(ids)}-token prompt"


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_prefill_logits_match_transformers(stage, case):
    name, folder, hf_model, _ = case
    llm = make_llm(stage, folder)
    for ids in PROMPTS:
        diff = (prefill_logits(llm, ids) - hf_logits(hf_model, ids)).abs().max().item()
        assert diff < LOGITS_ATOL, f"{stage}/{name}: max |logit diff| {diff:.2e}"


# --- settings the model code does not implement ----------------------------------------

REFUSED = {
    "gelu": ("llama", dict(hidden_act="gelu"), "hidden_act: 'gelu'"),
    # layer 1 of 2 attends to a 4-token window
    "sliding-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                     max_window_layers=1), "use_sliding_window"),
}


@pytest.fixture(scope="module")
def refused_folders(tmp_path_factory):
    return {name: save_tiny(tmp_path_factory, name, model_type, **overrides)[0]
            for name, (model_type, overrides, _) in REFUSED.items()}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("stage", stages_with("forward"))
def test_unsupported_setting_is_refused(stage, name, refused_folders):
    with pytest.raises(ValueError, match=re.escape(REFUSED[name][2])):
        make_llm(stage, refused_folders[name])


# --- checkpoints that do not fit the model ---------------------------------------------

@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory, "plain-llama", "llama")


def edited_checkpoint(src, dst, edit):
    """A copy of the folder `src` at `dst` whose state dict went through `edit`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_unknown_tensor_is_refused(stage, plain_llama, tmp_path):
    """E.g. a checkpoint with o_proj biases whose config.json does not say attention_bias."""
    name = "model.layers.1.self_attn.o_proj.bias"
    folder = edited_checkpoint(plain_llama[0], tmp_path / "m",
                               lambda t: t.update({name: torch.ones(64)}))
    with pytest.raises(ValueError, match=re.escape(name)):
        make_llm(stage, folder)


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_rotary_inv_freq_buffers_are_skipped(stage, plain_llama, tmp_path):
    """Older checkpoints saved the rotary buffers; they are recomputed, not refused."""
    folder, hf_model = plain_llama
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    folder = edited_checkpoint(folder, tmp_path / "m",
                               lambda t: t.update({name: torch.ones(8)}))
    diff = (prefill_logits(make_llm(stage, folder), PROMPTS[0])
            - hf_logits(hf_model, PROMPTS[0])).abs().max().item()
    assert diff < LOGITS_ATOL


@pytest.mark.parametrize("shape", [(1, 64), (128, 32)])  # (1, 64) would broadcast
@pytest.mark.parametrize("stage", stages_with("forward"))
def test_wrong_shaped_tensor_is_refused(stage, shape, plain_llama, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"  # [128, 64]
    folder = edited_checkpoint(plain_llama[0], tmp_path / "m",
                               lambda t: t.update({name: torch.ones(shape)}))
    with pytest.raises(ValueError, match=re.escape(f"{name} {shape}")):
        make_llm(stage, folder)


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    return save_tiny(tmp_path_factory, "tied-qwen2", "qwen2", tie_word_embeddings=True)


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_tied_lm_head_must_equal_the_embeddings(stage, tied_qwen2, tmp_path):
    """tie_word_embeddings with a saved lm_head.weight: a copy loads, a different one is
    refused (transformers would untie them and use it)."""
    src, hf_model = tied_qwen2
    embed = hf_model.model.embed_tokens.weight.detach()
    same = edited_checkpoint(src, tmp_path / "same",
                             lambda t: t.update({"lm_head.weight": embed.clone()}))
    diff = (prefill_logits(make_llm(stage, same), PROMPTS[0])
            - hf_logits(hf_model, PROMPTS[0])).abs().max().item()
    assert diff < LOGITS_ATOL
    other = edited_checkpoint(src, tmp_path / "other",
                              lambda t: t.update({"lm_head.weight": embed + 1.0}))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        make_llm(stage, other)


def _dummy_checkpoint(stage: str, model: str) -> dict:
    """A stage's dummy weights by the checkpoint's names (from M4, where q/k/v and gate/up
    are merged layers, through `checkpoint_layout`)."""
    loader = load_stage(f"{stage}.model_executor.model_loader")
    mc = loader.load_model_config(model)
    net = loader.load_model(model, mc, torch.float32, torch.device("cpu"), seed=0)
    layout = getattr(loader, "checkpoint_layout", None)
    named = layout(net).items() if layout else net.named_parameters()
    return {name: tensor.detach().clone() for name, tensor in named}


@pytest.mark.parametrize("model", ["dummy:tiny-llama", "dummy:tiny-qwen2", "dummy:tiny-qwen3"])
@pytest.mark.parametrize("stage", stages_with("flash_attn"))
def test_merged_layers_keep_the_dummy_weights_of_m3(stage, model):
    """M4 merges q/k/v and gate/up, yet draws a dummy model's weights per checkpoint
    tensor in M3's order: the same model, tensor for tensor, so stages compare alike."""
    want, got = _dummy_checkpoint("m3_paged_kv", model), _dummy_checkpoint(stage, model)
    assert list(got) == list(want)
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_the_8b_dummy_model_has_llama_3_1_8b_shapes(stage):
    """`dummy:llama-3.1-8b` resolves to Llama-3.1-8B's public config (GQA 32/8 heads,
    untied embeddings, llama3 RoPE scaling) without building a weight; its parameter
    count, from the shapes, is the model's 8.03e9."""
    loader = load_stage(f"{stage}.model_executor.model_loader")
    assert loader.resolve_model_path("dummy:llama-3.1-8b") is None  # no folder, no hub
    mc = loader.load_model_config("dummy:llama-3.1-8b")
    shapes = (mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers,
              mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, mc.vocab_size)
    assert shapes == (4096, 14336, 32, 32, 8, 128, 128256)
    assert mc.rope_theta == 500000.0 and mc.max_position_embeddings == 131072
    assert mc.rope_scaling == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert mc.rms_norm_eps == 1e-5 and not mc.tie_word_embeddings
    assert not (mc.attention_bias or mc.o_proj_bias or mc.mlp_bias or mc.qk_norm)
    assert (mc.bos_token_id, mc.eos_token_ids) == (128000, [128009])
    h, kv = 4096, 8 * 128
    layer = 2 * h * h + 2 * h * kv + 3 * h * 14336 + 2 * h  # q, o; k, v; MLP; two norms
    assert mc.num_parameters() == 32 * layer + 2 * 128256 * h + h == 8_030_261_248
