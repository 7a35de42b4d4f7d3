"""Each stage's demo CLI runs on a tiny dummy model and prints what the issue asks for.

Introduced in M1 (issue 2). M0 (`forward` only) prints the resolved config, a model
summary and the top-10 next tokens; stages that generate print a TTFT / TPOT /
tokens-per-second table, one row per prompt.
"""

import re

import pytest

from conftest import STAGES, run_cli, stages_with

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
    assert re.split(r"\s{2,}", lines[header].strip()) == [
        "request", "in", "out", "TTFT ms", "TPOT ms", "tok/s"]
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert len(rows) == 3  # the three default prompts
    for i, (index, n_in, n_out, ttft, tpot, rate) in enumerate(rows):
        assert int(index) == i and int(n_in) > 0 and 1 <= int(n_out) <= 4
        assert float(ttft) > 0 and float(tpot) >= 0 and float(rate) > 0
