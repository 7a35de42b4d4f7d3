"""Test setup: the stages under test, shared fixtures, and the `gpu` marker.

The stages come from the one registry, `bench/stages.py`: every stage package present in
this checkout, with its features. A test asks for the stages with a feature through
`stages_with(feature)`.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

# Without a GPU, M4's Triton kernels run under Triton's interpreter: that must be chosen
# before any kernel is defined (when a stage's ops module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import stages as _registry  # noqa: E402
from bench.stages import stages_with  # noqa: E402,F401

# stage package -> features it has (each stage has the features of the one before)
STAGES: dict[str, frozenset[str]] = {s.package: s.features for s in _registry.present_stages()}


def load_stage(name: str):
    return importlib.import_module(name)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- shared helpers (issue 2 suite) ----------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_TIMEOUT_S = 120


def run_cli(stage: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m STAGE.run ARGS` from the repo root, with a timeout so nothing hangs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-m", f"{stage}.run", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def default_model_folder():
    """The default model's HF folder (prepared on first use), found through the first stage."""
    first = next(iter(STAGES))
    return importlib.import_module(f"{first}.model_executor.default_model").ensure_default_model()


_DEFAULT_LLMS: dict = {}


def default_llm(stage: str):
    """One `LLM("default")` (CPU, fp32) per stage for the whole session (it loads in ~1 s)."""
    if stage not in _DEFAULT_LLMS:
        _DEFAULT_LLMS[stage] = load_stage(stage).LLM("default", device="cpu")
    return _DEFAULT_LLMS[stage]


def model_runner(llm):
    """The stage's model runner: M0's LLM holds it, later stages' engine does."""
    return llm.engine.model_runner if hasattr(llm, "engine") else llm.model_runner


def forward_entry(engine) -> str:
    """The model runner's method that the engine calls for a step: `launch_model` from M4
    on (a step queued, its result asked for later), `execute_model` before."""
    return "launch_model" if hasattr(engine.model_runner, "launch_model") else "execute_model"


class _Ran:
    """A step that already ran: what `launch_model` returns, from a plain output."""

    def __init__(self, output) -> None:
        self.output = output

    def result(self):
        return self.output


def replace_forward(engine, execute_model) -> None:
    """Make the engine run `execute_model(scheduler_output) -> ModelRunnerOutput` (a fake
    forward pass) in place of its model runner's, in any stage."""
    if forward_entry(engine) == "launch_model":
        engine.model_runner.launch_model = lambda out: _Ran(execute_model(out))
    else:
        engine.model_runner.execute_model = execute_model


def prefill_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] (float32) for every position of a prompt, from any stage's LLM.

    M0 runs the prompt through `LLM.next_token_distribution`; later stages through
    `generate` with one greedy token (which is one prefill). A hook on the model catches
    the hidden states of that prefill so the logits of all positions come out, not only
    the last one the engine itself needs. (The public way to see them is
    `SamplingParams(prompt_logprobs=k)`, tested on its own.)
    """
    runner = model_runner(llm)
    model = runner.model
    captured = []

    def keep(module, args, output):
        # M5 pads a step with tokens of no sequence, after the real ones
        metadata = args[3] if len(args) > 3 else None
        real = getattr(metadata, "query_start_loc", None)
        captured.append(output[:None if real is None else int(real[-1])].detach().clone())

    if hasattr(llm, "reset_prefix_cache"):  # M6: a cached prefix would not be computed
        llm.reset_prefix_cache()
    handle = model.register_forward_hook(keep)
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        runner.graphs = None  # a CUDA graph replay runs no hook: run this prefill eager
    try:
        if hasattr(llm, "next_token_distribution"):
            llm.next_token_distribution(list(token_ids), top_k=1)
        else:
            stage = importlib.import_module(type(llm).__module__.rsplit(".", 1)[0])
            llm.generate([list(token_ids)], stage.SamplingParams(temperature=0, max_tokens=1),
                         use_tqdm=False)
    finally:
        handle.remove()
        if graphs is not None:
            runner.graphs = graphs
    assert captured, "the prefill ran no forward pass through the model"
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in captured], dim=0)
    assert hidden.shape[0] == len(token_ids), (hidden.shape, len(token_ids))
    with torch.inference_mode():
        return model.compute_logits(hidden).float()


# Tiny random Hugging Face models, written with transformers itself (the reference).
TINY_HF_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)


def make_tiny_hf_model(model_type: str, seed: int = 0, std: float = 0.5, **overrides):
    """A transformers model of `model_type` (llama, qwen2, qwen3) with random weights.

    Every parameter is drawn from a seeded generator: weights and biases N(0, std), norm
    weights 1 + N(0, 0.2), so biases and norms are exercised too (transformers' own
    init leaves them at 0 and 1). The large std gives varied greedy outputs.
    """
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    config = config_cls(**{**TINY_HF_BASE, "initializer_range": std, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(std * noise)
    return model


def hf_greedy(hf_model, token_ids: list[int], num_tokens: int) -> list[int]:
    """transformers `generate`, greedy, exactly `num_tokens` new tokens (EOS suppressed)."""
    device = next(hf_model.parameters()).device
    input_ids = torch.tensor([token_ids], device=device)
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                do_sample=False, max_new_tokens=num_tokens,
                                min_new_tokens=num_tokens, top_p=None, top_k=None,
                                temperature=None)
    return out[0, len(token_ids):].tolist()


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids], device=device)).logits[0].float()
