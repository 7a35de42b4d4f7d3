"""Each stage's demo CLI runs on a tiny dummy model and prints what it promises.

Introduced in M1 (issue 2). M0 (`forward` only) prints the resolved config, a model
summary and the top-10 next tokens; stages that generate print a TTFT / TPOT /
tokens-per-second table, one row per prompt. With --stream they print the replies as
flowing text and end with one metrics line; M2+ keep the per-step view behind
--show-steps.
"""

import importlib
import re

import pytest

from conftest import STAGES, load_stage, run_cli, stages_with

FORWARD_ONLY = [s for s in stages_with("forward") if "generate" not in STAGES[s]]


@pytest.mark.parametrize("stage", FORWARD_ONLY)
def test_forward_cli_prints_config_model_and_top10(stage):
    result = run_cli(stage, "--model", "dummy:tiny-llama")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading in ("== config ==", "== model ==", "== prompt ==", "== top 10 next tokens =="):
        assert heading in out
    assert re.search(r"^\s+model\s+dummy:tiny-llama$", out, re.M)
    assert re.search(r"^\s+max_model_len\s+2048$", out, re.M)  # resolved from the model
    assert "LlamaForCausalLM: 2 layers, hidden 64, 4 heads (2 KV), head_dim 16" in out
    top = out.split("== top 10 next tokens ==")[1].strip().splitlines()
    probs = [float(re.match(r"\s*([\d.]+)%", line).group(1)) for line in top]
    assert len(probs) == 10
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.0 + 1e-6


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_generate_cli_prints_metrics_table(stage):
    result = run_cli(stage, "--model", "dummy:tiny-llama", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "TTFT ms" in line)
    cached = ["cached"] if stage in stages_with("prefix_cache") else []  # M6's column
    assert re.split(r"\s{2,}", lines[header].strip()) == [
        "request", "in", *cached, "out", "TTFT ms", "TPOT ms", "tok/s"]
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert len(rows) == 3  # the three default prompts
    for i, row in enumerate(rows):
        if cached:
            assert 0 <= int(row.pop(2)) < int(row[1])  # prompt tokens found in the cache
        index, n_in, n_out, ttft, tpot, rate = row
        assert int(index) == i and int(n_in) > 0 and 1 <= int(n_out) <= 4
        assert float(ttft) > 0 and float(tpot) >= 0 and float(rate) > 0


TINY = ("--model", "dummy:tiny-llama", "--device", "cpu")
METRICS_LINE = re.compile(r"^(?:(\d+) requests, )?(\d+) tokens in [\d.]+ s · (?:mean )?TTFT "
                          r"\d+ ms · (?:mean )?TPOT [\d.]+ ms · [\d.]+ tok/s$")


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_stream_demo_prints_replies_then_one_metrics_line(stage):
    result = run_cli(stage, *TINY, "--stream", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("step ")], result.stdout
    assert "TTFT ms" not in result.stdout and "KV cache" not in result.stdout
    headers = [line for line in lines if line.startswith("--- ")]
    assert headers == ["--- 'The capital of France is'", "--- 'def fibonacci(n):'",
                       "--- 'Three things to pack for a beach holiday:'"]
    match = METRICS_LINE.match(lines[-1])
    assert match, lines[-1]
    assert int(match.group(1)) == 3 and 3 <= int(match.group(2)) <= 24


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_stream_text_flows_in_prompt_order(stage, monkeypatch, capsys):
    """The front reply is printed piece by piece while it is generated, never interleaved."""
    prompts = ["Three things to pack for a beach holiday:", "def fibonacci(n):"]
    pkg = load_stage(stage)
    params = pkg.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts = [out.text for out in pkg.LLM("dummy:tiny-llama", device="cpu").generate(
        prompts, params, use_tqdm=False)]
    engine_cls = importlib.import_module(f"{stage}.engine.llm_engine").LLMEngine
    real_step, printed = engine_cls.step, []  # printed[i]: stdout written before step i

    def step(self):
        printed.append(capsys.readouterr().out)
        return real_step(self)

    monkeypatch.setattr(engine_cls, "step", step)
    run = importlib.import_module(f"{stage}.run")
    argv = [*TINY, "--stream", "--max-tokens", "8", "--ignore-eos"]
    assert run.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    printed.append(capsys.readouterr().out)
    out = "".join(printed)
    *blocks, last = out.rstrip("\n").split("\n\n")
    assert blocks == [f"--- {p!r}\n{t}  [length]" for p, t in zip(prompts, texts)], out
    assert METRICS_LINE.match(last), last
    assert printed[0] == f"--- {prompts[0]!r}\n"  # the header shows before the first step
    first = "".join(printed[1:8])  # the first reply's text written before its 8th token
    assert texts[0].startswith(first) and len([c for c in printed[1:8] if c]) >= 2, printed


@pytest.mark.parametrize("stage", stages_with("batching"))
def test_show_steps_prints_one_line_per_step(stage):
    result = run_cli(stage, *TINY, "--show-steps", "--max-tokens", "8", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 8, result.stdout  # 3 requests of 8 tokens, batched together
    assert all(f"cli-{i}:" in line for line in steps for i in range(3))
    assert "KV cache:" in result.stdout and "TTFT ms" in result.stdout


@pytest.mark.parametrize("stage", stages_with("generate"))
def test_help_describes_every_flag(stage):
    result = run_cli(stage, "--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:")[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))  # one per flag, with its text
    described = {}
    for entry in entries:
        flag = re.match(r"\s*(?:-\w, )?(--[\w-]+)", entry).group(1)
        words = re.sub(r"^\s*(?:-\w, )?--[\w-]+(?: \S+)?", "", entry).split()
        described[flag] = len(words) >= 2
    wanted = {"--model", "--prompt", "--chat", "--stream", "--max-tokens", "--temperature",
              "--top-p", "--top-k", "--seed", "--ignore-eos", "--device", "--dtype"}
    if "batching" in STAGES[stage]:
        wanted |= {"--max-batch-size", "--show-steps"}
    assert wanted <= set(described), sorted(described)
    assert all(described.values()), [flag for flag, ok in described.items() if not ok]


@pytest.mark.parametrize("stage", stages_with("generate"))
@pytest.mark.parametrize("flag", ["--stream", "--show-steps"])
def test_bad_value_is_an_error_before_streaming(stage, flag):
    if flag == "--show-steps" and "batching" not in STAGES[stage]:
        pytest.skip("M2+ flag")
    result = run_cli(stage, *TINY, flag, "--max-tokens", "0")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: max_tokens"), result.stderr
