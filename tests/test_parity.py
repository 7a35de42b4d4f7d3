"""HF parity: every stage gives the same greedy tokens and prefill logits as transformers.

Introduced in M1 (issue 2). The reference is transformers on the same weights in fp32 on
the CPU: the default model (SmolLM2-135M-Instruct) on 5 prompts x 32 tokens, and tiny
random Llama (with and without Llama-3 rope scaling), Qwen2 and Qwen3 models written by
transformers itself. Stages join through the registry in conftest.py.
"""

import pytest
import torch
from transformers.utils import logging as hf_logging

from conftest import (default_llm, default_model_folder, hf_greedy, hf_logits, load_stage,
                      make_tiny_hf_model, model_runner, prefill_logits, stages_with)

hf_logging.set_verbosity_error()

LOGITS_ATOL = 1e-4

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "1, 2, 3, 4,",
]
NUM_TOKENS_DEFAULT = 32

# Token-id prompts of different lengths for the tiny models (ids < 512).
TINY_PROMPTS = [
    [5, 77, 300],
    [1, 42, 17, 250, 9, 411, 123, 64, 88, 7, 500],
    [(i * 37 + 11) % 512 for i in range(40)],
]
NUM_TOKENS_TINY = 24

TINY_CONFIGS = {
    "llama": ("llama", dict(rope_theta=10000.0)),
    "llama3-rope": ("llama", dict(rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(rope_theta=1000000.0, head_dim=32)),
}


# --- the default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_default():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(default_model_folder()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def default_prompt_ids():
    """Token ids of the prompts, from the model folder's own tokenizer (no BOS added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_folder()))
    return [tokenizer.encode(p) for p in DEFAULT_PROMPTS]


@pytest.fixture(scope="module")
def hf_default_tokens(hf_default, default_prompt_ids):
    return [hf_greedy(hf_default, ids, NUM_TOKENS_DEFAULT) for ids in default_prompt_ids]


@pytest.mark.slow  # the default model (SmolLM2-135M)
@pytest.mark.parametrize("stage", stages_with("generate"))
def test_default_model_greedy_matches_transformers(stage, default_prompt_ids,
                                                   hf_default_tokens):
    llm = default_llm(stage)
    SamplingParams = load_stage(stage).SamplingParams
    # Our tokenizer gives the same ids as transformers' for the text prompts.
    assert [llm.encode(p) for p in DEFAULT_PROMPTS] == default_prompt_ids
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS_DEFAULT,
                            min_tokens=NUM_TOKENS_DEFAULT)
    outputs = llm.generate(DEFAULT_PROMPTS, params, use_tqdm=False)
    for prompt, out, expected in zip(DEFAULT_PROMPTS, outputs, hf_default_tokens):
        assert len(out.token_ids) == NUM_TOKENS_DEFAULT
        assert out.token_ids == expected, f"{stage} diverges from transformers on {prompt!r}"
        assert out.finish_reason == "length"


@pytest.mark.slow  # the default model (SmolLM2-135M)
@pytest.mark.parametrize("stage", stages_with("forward"))
def test_default_model_prefill_logits_match_transformers(stage, hf_default,
                                                         default_prompt_ids,
                                                         hf_default_tokens):
    llm = default_llm(stage)
    # A short prompt and a longer one (a prompt followed by its 32 generated tokens).
    for ids in (default_prompt_ids[0], default_prompt_ids[2] + hf_default_tokens[2]):
        ours = prefill_logits(llm, ids)
        ref = hf_logits(hf_default, ids)
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff < LOGITS_ATOL, f"{stage}: max |logit diff| {diff:.2e} on {len(ids)} tokens"


@pytest.mark.slow  # the default model (SmolLM2-135M)
@pytest.mark.parametrize("stage", [s for s in stages_with("forward")
                                   if s not in stages_with("generate")])
def test_next_token_distribution_agrees_with_prefill_logits(stage, default_prompt_ids):
    """M0's public top-k API reports the softmax of the last position's logits."""
    llm = default_llm(stage)
    ids = default_prompt_ids[0]
    probs = torch.softmax(prefill_logits(llm, ids)[-1], dim=-1)
    top = llm.next_token_distribution(ids, top_k=5)
    assert [t for t, _, _ in top] == torch.topk(probs, 5).indices.tolist()
    assert [p for _, _, p in top] == pytest.approx(torch.topk(probs, 5).values.tolist(),
                                                   abs=1e-6)
    assert top[0][1] == llm.tokenizer.decode([top[0][0]])


def assert_position_logprobs(position: dict, ref: torch.Tensor, chosen: int, num_top: int,
                             tokenizer) -> None:
    """One position of `logprobs`/`prompt_logprobs` against transformers' log-softmax."""
    assert chosen in position
    top = ref.topk(num_top)
    assert set(top.indices.tolist()) <= set(position)
    assert len(position) in (num_top, num_top + 1)  # the chosen token may be outside the top
    for token, lp in position.items():
        assert lp.logprob == pytest.approx(ref[token].item(), abs=LOGITS_ATOL)
        assert lp.decoded_token == tokenizer.decode([token])
        # rank 1 is the most likely; allow for near-ties within the tolerance
        assert (1 + (ref > ref[token] + LOGITS_ATOL).sum().item() <= lp.rank
                <= 1 + (ref > ref[token] - LOGITS_ATOL).sum().item())


@pytest.mark.slow  # the default model (SmolLM2-135M)
@pytest.mark.parametrize("stage", stages_with("generate"))
def test_logprobs_match_transformers(stage, hf_default, default_prompt_ids):
    """`logprobs` and `prompt_logprobs` (vLLM's) report the model's log-softmax."""
    llm = default_llm(stage)
    ids = default_prompt_ids[2]
    ref = torch.log_softmax(hf_logits(hf_default, ids), dim=-1)
    params = load_stage(stage).SamplingParams(temperature=0, max_tokens=1, logprobs=5,
                                              prompt_logprobs=3)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for j in range(1, len(ids)):  # position j - 1 predicts prompt token j
        assert_position_logprobs(out.prompt_logprobs[j], ref[j - 1], ids[j], 3, llm.tokenizer)
    (generated,) = out.outputs[0].logprobs
    assert_position_logprobs(generated, ref[-1], out.token_ids[0], 5, llm.tokenizer)
    assert generated[out.token_ids[0]].rank == 1  # greedy took the most likely token
    # Without asking, nothing is computed or returned.
    plain = llm.generate([ids], load_stage(stage).SamplingParams(temperature=0, max_tokens=1),
                         use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].logprobs is None


# --- tiny random models ----------------------------------------------------------------

@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(folder, transformers model, reference greedy tokens) for one tiny config."""
    model_type, overrides = TINY_CONFIGS[request.param]
    hf_model = make_tiny_hf_model(model_type, seed=1234, **overrides)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf_model.save_pretrained(folder)  # no tokenizer: our engine uses the byte stand-in
    expected = [hf_greedy(hf_model, ids, NUM_TOKENS_TINY) for ids in TINY_PROMPTS]
    return request.param, folder, hf_model, expected


def load_tiny(stage: str, folder):
    with pytest.warns(UserWarning, match="no tokenizer files"):
        return load_stage(stage).LLM(model=str(folder), device="cpu")


def test_tiny_models_are_not_trivial(tiny_model):
    """The reference outputs vary, so matching them is a real check."""
    name, _, _, expected = tiny_model
    for tokens in expected:
        assert len(set(tokens)) >= 3, f"{name}: reference output is degenerate: {tokens}"
    assert len({tuple(t) for t in expected}) == len(expected)


def test_tiny_model_config_is_read(tiny_model):
    """The engine reads the features the tiny configs switch on."""
    name, folder, hf_model, _ = tiny_model
    stage = stages_with("forward")[0]
    mc = model_runner(load_tiny(stage, folder)).model_config
    hf = hf_model.config
    expected_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert mc.head_dim == expected_head_dim
    assert mc.qk_norm == (name == "qwen3")
    assert mc.attention_bias == (name == "qwen2")
    assert mc.tie_word_embeddings == (name == "qwen2")
    if name == "llama3-rope":
        assert mc.rope_scaling is not None and mc.rope_scaling["rope_type"] == "llama3"
    if name == "qwen3":
        assert mc.head_dim == 32 != mc.hidden_size // mc.num_attention_heads


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_tiny_model_greedy_matches_transformers(stage, tiny_model):
    name, folder, _, expected = tiny_model
    llm = load_tiny(stage, folder)
    SamplingParams = load_stage(stage).SamplingParams
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS_TINY,
                            min_tokens=NUM_TOKENS_TINY)
    outputs = llm.generate(TINY_PROMPTS, params, use_tqdm=False)
    for ids, out, ref in zip(TINY_PROMPTS, outputs, expected):
        assert out.token_ids == ref, f"{stage}/{name}: diverges on a {len(ids)}-token prompt"


@pytest.mark.parametrize("stage", stages_with("forward"))
def test_tiny_model_prefill_logits_match_transformers(stage, tiny_model):
    name, folder, hf_model, _ = tiny_model
    llm = load_tiny(stage, folder)
    for ids in TINY_PROMPTS:
        ours = prefill_logits(llm, ids)
        ref = hf_logits(hf_model, ids)
        diff = (ours - ref).abs().max().item()
        assert diff < LOGITS_ATOL, f"{stage}/{name}: max |logit diff| {diff:.2e}"


NUM_TOKENS_FLASH = 8  # the Triton interpreter is slow: a short greedy run


@pytest.mark.parametrize("stage", stages_with("flash_attn"))
def test_tiny_model_greedy_matches_transformers_with_the_triton_kernels(stage, tiny_model):
    """M4's `flash` backend (on the CPU: the same Triton kernels under the interpreter)."""
    name, folder, _, expected = tiny_model
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = load_stage(stage).LLM(model=str(folder), device="cpu", attention_backend="flash")
    assert llm.engine.model_runner.attention_backend == "flash"
    SamplingParams = load_stage(stage).SamplingParams
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS_FLASH,
                            min_tokens=NUM_TOKENS_FLASH)
    outputs = llm.generate(TINY_PROMPTS, params, use_tqdm=False)
    for ids, out, ref in zip(TINY_PROMPTS, outputs, expected):
        assert out.token_ids == ref[:NUM_TOKENS_FLASH], \
            f"{stage}/{name}: diverges on a {len(ids)}-token prompt"
