"""Bad input: each mistake is a ValueError (or a CLI `error:` line, exit 2) naming it; a
sampling parameter of the wrong type (a bool for a number too) is a TypeError naming it.

Introduced in M1 (issue 2). Covers prompts, sampling parameters, engine settings and
model names, through the public API of every stage and through each stage's `run` CLI.
Nothing may hang: every subprocess has a timeout.
"""

import pytest

from conftest import STAGES, load_stage, run_cli, stages_with

ALL_STAGES = list(STAGES)
FORWARD_STAGES = stages_with("forward")
GENERATE_STAGES = stages_with("generate")
# M0 has no generate: its LLM runs one forward pass, `next_token_distribution`.
FORWARD_ONLY_STAGES = [s for s in FORWARD_STAGES if s not in GENERATE_STAGES]


@pytest.fixture(scope="module")
def tiny_llms():
    return {stage: load_stage(stage).LLM("dummy:tiny-llama", max_model_len=32, device="cpu")
            for stage in FORWARD_STAGES}


# --- prompts ---------------------------------------------------------------------------

@pytest.mark.parametrize("stage", FORWARD_ONLY_STAGES)
def test_empty_prompt_forward(stage, tiny_llms):
    with pytest.raises(ValueError, match="prompt.*empty"):
        tiny_llms[stage].next_token_distribution("")
    with pytest.raises(ValueError, match="prompt"):
        tiny_llms[stage].next_token_distribution([])


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_empty_prompt_generate(stage, tiny_llms):
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(ValueError, match="prompt.*empty"):
        tiny_llms[stage].generate("", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        tiny_llms[stage].generate([[]], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("stage", FORWARD_ONLY_STAGES)
def test_prompt_longer_than_max_model_len_forward(stage, tiny_llms):
    with pytest.raises(ValueError, match="max_model_len=32"):
        tiny_llms[stage].next_token_distribution("x" * 40)


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_prompt_longer_than_max_model_len_generate(stage, tiny_llms):
    llm = tiny_llms[stage]
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(ValueError, match="max_model_len=32"):
        llm.generate("x" * 40, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=32"):
        llm.generate([list(range(3, 43))], SamplingParams(max_tokens=2), use_tqdm=False)
    # A rejected request leaves the engine usable.
    out = llm.generate("ok", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 2


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_token_ids_outside_the_vocabulary(stage, tiny_llms):
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(ValueError, match="token ids"):
        tiny_llms[stage].generate([[5, 512]], SamplingParams(max_tokens=2), use_tqdm=False)


# --- sampling parameters ---------------------------------------------------------------

@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    # NaN fails every comparison and inf passes one-sided ones: both must be refused.
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1e-6), "temperature"),  # logits / temperature overflows float32
    (dict(temperature=1e-300), "temperature"),
    (dict(temperature=1e39), "temperature"),  # inf in float32
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
    (dict(top_k=2**63), "top_k"),  # does not fit the sampler's int64 tensor
    (dict(seed=2**64), "seed"),  # torch.Generator.manual_seed takes 64 bits
    (dict(seed=-1), "seed"),  # torch would alias it to 2**64 - 1
    (dict(stop="\ud800"), "stop"),  # a lone surrogate is not UTF-8
    (dict(stop=["fine", "a\udfffb"]), "stop"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
])
def test_bad_sampling_params(stage, kwargs, field):
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("kwargs, field", [
    # isinstance(True, int) is True in Python: bools must still be refused.
    (dict(max_tokens=True), "max_tokens"),
    (dict(top_k=True), "top_k"),
    (dict(min_tokens=False), "min_tokens"),
    (dict(seed=True), "seed"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(logprobs=True), "logprobs"),
    (dict(prompt_logprobs=False), "prompt_logprobs"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=True), "top_p"),
    (dict(temperature="0.5"), "temperature"),
    (dict(max_tokens=4.0), "max_tokens"),
    (dict(prompt_logprobs=1.0), "prompt_logprobs"),
    (dict(stop=5), "stop"),
    (dict(stop=["ok", 1]), "stop"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(ignore_eos="no"), "ignore_eos"),
])
def test_wrong_type_sampling_params(stage, kwargs, field):
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(TypeError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_edge_sampling_params_are_accepted(stage):
    SamplingParams = load_stage(stage).SamplingParams
    SamplingParams(temperature=0, top_p=1.0, max_tokens=1)
    SamplingParams(top_p=1e-6, top_k=0, min_p=1.0, min_tokens=3, max_tokens=3)
    SamplingParams(temperature=1e-5, seed=0, logprobs=0, prompt_logprobs=20)
    SamplingParams(temperature=1e5, seed=2**64 - 1, logprobs=20, prompt_logprobs=0,
                   repetition_penalty=1e-5, stop=("é", "\U0001F600"),
                   stop_token_ids=(1, 2))
    params = SamplingParams()
    assert params.logprobs is None and params.prompt_logprobs is None


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_edge_sampling_params_generate(stage, tiny_llms):
    """The extreme accepted values run (the largest seed fits torch.Generator)."""
    SamplingParams = load_stage(stage).SamplingParams
    for kwargs in (dict(seed=2**64 - 1), dict(seed=0), dict(temperature=1e-5, seed=1),
                   dict(repetition_penalty=1e-5, seed=2),
                   dict(repetition_penalty=1e5, seed=3)):
        out = tiny_llms[stage].generate("ok", SamplingParams(max_tokens=3, ignore_eos=True,
                                                             **kwargs), use_tqdm=False)[0]
        assert len(out.token_ids) == 3, kwargs


# --- engine settings and models --------------------------------------------------------

@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("kwargs, field", [
    (dict(dtype="float8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len="long"), "max_model_len"),
    (dict(model=""), "model"),
])
def test_bad_engine_config(stage, kwargs, field):
    EngineConfig = load_stage(stage).EngineConfig
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        EngineConfig(**{"model": "dummy:tiny-llama", **kwargs})


@pytest.mark.parametrize("stage", FORWARD_STAGES)
def test_max_model_len_beyond_the_model(stage):
    with pytest.raises(ValueError, match="max_model_len.*2048"):
        load_stage(stage).LLM("dummy:tiny-llama", max_model_len=4096)


@pytest.mark.parametrize("stage", FORWARD_STAGES)
def test_unknown_model_path(stage, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        load_stage(stage).LLM(missing)
    (tmp_path / "empty").mkdir()  # a folder without config.json is not a model either
    with pytest.raises(ValueError, match="config.json"):
        load_stage(stage).LLM(str(tmp_path / "empty"))


@pytest.mark.parametrize("stage", FORWARD_STAGES)
def test_unknown_dummy_name(stage):
    with pytest.raises(ValueError, match="unknown dummy model 'nope'"):
        load_stage(stage).LLM("dummy:nope")


@pytest.mark.parametrize("stage", FORWARD_STAGES)
def test_cuda_without_a_gpu(stage):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device"):
        load_stage(stage).LLM("dummy:tiny-llama", device="cuda")


# --- the CLIs --------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("model, message", [
    ("dummy:nope", "unknown dummy model 'nope'"),
    ("/nonexistent", "/nonexistent"),
])
def test_cli_bad_model(stage, model, message):
    result = run_cli(stage, "--model", model)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_cli_help(stage):
    result = run_cli(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout and f"{stage}.run" in result.stdout


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_bad_prompt_in_a_list_adds_no_request(stage, tiny_llms):
    """A list with one bad prompt is rejected as a whole: nothing is left queued."""
    llm = tiny_llms[stage]
    SamplingParams = load_stage(stage).SamplingParams
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("stage", GENERATE_STAGES)
@pytest.mark.parametrize("prompts, error, match", [
    (5, TypeError, "prompts"),  # an int is not a prompt
    ("torch", TypeError, "prompt"),  # a tensor is not a list of token ids (made below)
    ([[5, True, 7]], ValueError, "token ids"),  # a bool is not a token id
    ([[5, 7.0]], ValueError, "token ids"),
    ("caf\udce9", ValueError, "prompt.*not valid text"),  # a lone surrogate
])
def test_prompts_of_the_wrong_kind(stage, tiny_llms, prompts, error, match):
    import torch

    llm = tiny_llms[stage]
    if prompts == "torch":
        prompts = torch.tensor([5, 6, 7])
    with pytest.raises(error, match=match):
        llm.generate(prompts, load_stage(stage).SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_stop_token_ids_outside_the_vocabulary(stage, tiny_llms):
    llm = tiny_llms[stage]
    vocab = llm.engine.vocab_size
    for bad in ([vocab], [10**9]):
        params = load_stage(stage).SamplingParams(max_tokens=2, stop_token_ids=bad)
        with pytest.raises(ValueError, match="stop_token_ids"):
            llm.generate("ok", params, use_tqdm=False)
    params = load_stage(stage).SamplingParams(max_tokens=2, stop_token_ids=[vocab - 1])
    assert llm.generate("ok", params, use_tqdm=False)[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("stage", FORWARD_ONLY_STAGES)
def test_m0_prompts_of_the_wrong_kind(stage, tiny_llms):
    llm = tiny_llms[stage]
    with pytest.raises(TypeError, match="prompt"):
        llm.next_token_distribution(5)
    with pytest.raises(ValueError, match="token ids"):
        llm.next_token_distribution([5, True])
    with pytest.raises(ValueError, match="not valid text"):
        llm.next_token_distribution("caf\udce9")
