"""An engine that stays usable: errors inside a step, outputs of others, the config.

Introduced with the reshaped step (issue 7), for every generating stage. `LLM.generate`
must leave the engine clean on any exception, Ctrl-C included (it aborts what it added,
frees their KV cache and re-raises); a step that fails half-way must not wedge the
requests that survive it; `generate` returns its own requests and hands outputs of
requests that someone added to the engine directly back to the engine, so none is
lost; and building an `LLM` resolves the config in a copy.
"""

import pytest

from conftest import forward_entry, load_stage, model_runner, stages_with

STAGES = stages_with("generate")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]


def tiny(stage: str, **kwargs):
    return load_stage(stage).LLM("dummy:tiny-llama", device="cpu", max_model_len=128, **kwargs)


def greedy(stage: str, n: int = 8):
    return load_stage(stage).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def assert_clean(llm) -> None:
    """No request left, no KV cache held (slots, blocks, or M1's per-request caches)."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.requests and not engine.sequences
    if hasattr(engine, "kv_cache_stats"):
        assert engine.kv_cache_stats()["used_token_slots"] == 0
        scheduler = engine.scheduler
        if hasattr(scheduler, "kv_cache_manager"):
            pool = scheduler.kv_cache_manager.block_pool
            assert pool.num_free_blocks == pool.num_blocks
        else:
            assert len(scheduler.free_slots) == scheduler.num_kv_slots
    else:
        assert model_runner(llm).kv_caches == {}


def fail_on_call(n: int, exc: BaseException):
    """A stand-in for a method that raises `exc` on its n-th call and works otherwise."""
    def install(obj, name):
        real, calls = getattr(obj, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise exc
            return real(*args, **kwargs)
        setattr(obj, name, wrapper)
        return lambda: delattr(obj, name) if name in vars(obj) else None
    return install


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("exc", [RuntimeError("boom in a step"), KeyboardInterrupt()])
def test_an_error_in_a_step_leaves_the_engine_clean(stage, exc):
    llm = tiny(stage)
    expected = [o.token_ids for o in llm.generate(PROMPTS, greedy(stage), use_tqdm=False)]
    restore = fail_on_call(3, exc)(llm.engine.model_runner, forward_entry(llm.engine))
    with pytest.raises(type(exc)):
        llm.generate(PROMPTS, greedy(stage), use_tqdm=False)
    restore()
    assert_clean(llm)
    again = llm.generate(PROMPTS, greedy(stage), use_tqdm=False)
    assert [o.token_ids for o in again] == expected


@pytest.mark.parametrize("stage", STAGES)
def test_the_reported_trigger_is_refused_up_front(stage):
    """stop_token_ids outside the vocabulary once passed validation and broke the sampler."""
    llm = tiny(stage)
    params = load_stage(stage).SamplingParams(stop_token_ids=[10**9], min_tokens=2)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(PROMPTS, params, use_tqdm=False)
    assert_clean(llm)
    assert len(llm.generate("ok", greedy(stage, 3), use_tqdm=False)[0].token_ids) == 3


@pytest.mark.parametrize("stage", STAGES)
def test_generate_leaves_other_requests_alone(stage):
    """A request added to the engine directly is neither returned nor dropped."""
    llm = tiny(stage)
    alone = llm.generate(PROMPTS[2], greedy(stage, 4), use_tqdm=False)[0].token_ids
    llm.engine.add_request("theirs", PROMPTS[2], greedy(stage, 4))
    mine = llm.generate(PROMPTS[:2], greedy(stage, 12), use_tqdm=False)
    assert [o.request_id for o in mine] == [f"req-{i}" for i in (1, 2)]
    # "theirs" (4 tokens) finished during that call: its output waits in the engine.
    assert llm.engine.has_unfinished_requests()
    theirs = [o for o in llm.engine.step() if o.request_id == "theirs"]
    assert len(theirs) == 1 and theirs[0].finished and theirs[0].token_ids == alone
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_held_outputs_survive_a_failed_step(stage):
    llm = tiny(stage)
    engine = llm.engine
    engine.add_request("x", PROMPTS[1], greedy(stage, 1))
    (done,) = engine.step()
    assert done.finished
    engine.hold_outputs([done])  # as `generate` does with an output that is not its own
    engine.add_request("a", PROMPTS[0], greedy(stage, 3))
    restore = fail_on_call(1, RuntimeError("boom"))(engine.model_runner,
                                               forward_entry(engine))
    with pytest.raises(RuntimeError):
        engine.step()
    restore()
    outputs = {o.request_id: o for o in engine.step()}
    assert sorted(outputs) == ["a", "x"] and outputs["x"] is done
    assert len(outputs["a"].token_ids) == 1
    assert engine.step()[0].request_id == "a"  # held outputs come back once
    engine.abort_request("a")
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_a_step_that_fails_half_way_does_not_wedge_the_others(stage, monkeypatch):
    """An error while outputs are processed (after the forward pass) leaves every request
    where a retry of the step recomputes it: same tokens as a clean run. A repetition
    penalty makes the tokens depend on the history the sampler keeps, which must not
    count the lost step's token."""
    llm = tiny(stage)
    params = load_stage(stage).SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                              repetition_penalty=1.5)
    expected = {f"r{i}": o.token_ids for i, o in
                enumerate(llm.generate(PROMPTS, params, use_tqdm=False))}
    # The one place a step's results change the sequences (M2 on; M1's engine loop)
    if stage in stages_with("batching"):
        owner = load_stage(f"{stage}.core.sched.stop_checker").StopChecker
        name = "append_token"
    else:
        owner, name = load_stage(f"{stage}.engine.llm_engine"), "process_token"
    real = getattr(owner, name)
    for i, prompt in enumerate(PROMPTS):
        llm.engine.add_request(f"r{i}", prompt, params)
    llm.engine.step()
    calls = [0]
    fail_at = 2 if stage in stages_with("batching") else 1  # half-way through a batch

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("boom while processing outputs")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    with pytest.raises(RuntimeError):
        llm.engine.step()
    monkeypatch.setattr(owner, name, real)
    finished = {}
    for _ in range(100):
        if not llm.engine.has_unfinished_requests():
            break
        finished.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert {rid: o.token_ids for rid, o in finished.items()} == expected
    assert_clean(llm)


@pytest.mark.parametrize("stage", STAGES)
def test_the_callers_config_is_not_changed(stage):
    mod = load_stage(stage)
    config = mod.EngineConfig(model="dummy:tiny-llama", device="cpu")
    llm = mod.LLM(config=config)
    assert config.max_model_len is None  # left as the caller made it
    assert llm.config.max_model_len == 2048  # the model's limit (tiny-llama: 2048)
    assert llm.engine.config is llm.config
    with pytest.raises(ValueError, match="config"):
        mod.LLM(config=config, max_model_len=64)
