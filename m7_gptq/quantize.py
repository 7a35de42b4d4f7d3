"""`python -m m7_gptq.quantize`: write a GPTQ checkpoint of a model (GPTQ or RTN).

The model runs on calibration text (`calibration.py`) one decoder layer at a time: hooks
sum each linear's input products into its Hessian, each linear is quantized from it
(`gptq_solver.py`; RTN just rounds), and the layer's output with the quantized weights
is the next layer's input (--true-sequential: each linear's, inside a layer too). The folder is a standard GPTQ checkpoint (format v1) with the
tokenizer files and `quantize_log.json` (provenance, settings, each linear's relative
output error).

    python -m m7_gptq.quantize --model default --bits 4 --group-size 64 --out /tmp/q4

Introduced in M7.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import calibration
from .attention.backends.torch_ref import build_metadata
from .attention.metadata import AttentionMetadata
from .config import ModelConfig
from .eval_ppl import provenance
from .gptq_solver import gptq_quantize, output_error, rtn_quantize
from .model_executor.layers.quantization.gptq import (GPTQConfig, GPTQLinear, dequantize,
                                                      pack_layer)
from .model_executor.model_loader import (DUMMY_CONFIGS, DUMMY_PREFIX, checkpoint_layout,
                                          load_model, load_model_config, resolve_model_path)
from .tokenizer import get_tokenizer

# The linears of a decoder layer, each with its own input (and Hessian); q/k/v and gate/up
# are merged layers (M4), whose parts are quantized one by one from the one Hessian.
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
SEQS_PER_PASS = 8  # calibration sequences run through a layer at once
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class QuantizeError(ValueError):
    """Bad input: the CLI prints it and exits with status 2."""


# --- running one decoder layer over the calibration sequences ----------------------------

@dataclass
class Pass:
    """What one forward of a decoder layer over a few sequences needs besides the input."""

    positions: torch.Tensor
    metadata: AttentionMetadata
    kv_cache: tuple[torch.Tensor, torch.Tensor]


def make_passes(num_seqs: int, seq_len: int, mc: ModelConfig,
                device: torch.device) -> list[Pass]:
    """The passes over `num_seqs` sequences, SEQS_PER_PASS at a time: each sequence one
    whole prompt in a KV cache block of its own (block size = seq_len)."""
    passes, caches = [], {}
    for start in range(0, num_seqs, SEQS_PER_PASS):
        b = min(SEQS_PER_PASS, num_seqs - start)
        if b not in caches:
            shape = (b, seq_len, mc.num_key_value_heads, mc.head_dim)
            caches[b] = (torch.empty(shape, device=device), torch.empty(shape, device=device))
        md = AttentionMetadata(
            query_start_loc=torch.arange(b + 1, device=device) * seq_len,
            seq_lens=torch.full((b,), seq_len, device=device),
            block_tables=torch.arange(b, device=device)[:, None],
            slot_mapping=torch.arange(b * seq_len, device=device),
            max_query_len=seq_len, max_seq_len=seq_len)
        md = build_metadata(md, seq_len, mc.num_attention_heads // mc.num_key_value_heads)
        passes.append(Pass(torch.arange(seq_len, device=device).repeat(b), md, caches[b]))
    return passes


def run_layer(layer, states: list, passes: list[Pass]) -> list:
    """The layer's (output, residual) for each pass's (input, residual)."""
    return [layer(p.positions, x, residual, p.kv_cache, p.metadata)
            for (x, residual), p in zip(states, passes)]


def collect_hessians(layer, states: list, passes: list[Pass],
                     names: tuple[str, ...] = LINEARS) -> dict[str, torch.Tensor]:
    """One forward pass with hooks: H = 2 X Xᵀ / n of the input of each linear in
    `names`, summed pass by pass."""
    sums, handles = {}, []

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            total, n = sums.get(name, (0, 0))
            sums[name] = (total + x.t() @ x, n + x.shape[0])
        return accumulate

    for name in names:
        handles.append(layer.get_submodule(name).register_forward_hook(hook(name)))
    try:
        run_layer(layer, states, passes)
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * total / n for name, (total, n) in sums.items()}


def linear_parts(layer, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint's linears in the layer's linear `name`: {its name: its weight rows},
    the parts of a merged layer (self_attn.q_proj, ...) or the layer itself."""
    linear = layer.get_submodule(name)
    shards = getattr(linear, "shards", None)
    if shards is None:
        return {name: linear.weight.data}
    parent = name.rpartition(".")[0]
    return {f"{parent}.{part}": linear.weight.data[linear.shard_rows(part)] for part in shards}


# --- quantizing the model ------------------------------------------------------------------

def quantize_layer(layer, hessians: dict, config: GPTQConfig, method: str) -> tuple:
    """Quantize the linears named in `hessians` in place (their weights become the
    dequantized ones).
    Returns ({linear name: checkpoint tensors}, {linear name: relative output error}, and
    for GPTQ {linear name: RTN's error on the same inputs}, for comparison), by the
    checkpoint's names (q_proj, k_proj, ...)."""
    tensors, errors, rtn_errors = {}, {}, {}
    for group in hessians:
        h = hessians[group].cpu()  # the solver runs on the CPU: one weight at a time
        for name, weight in linear_parts(layer, group).items():
            w = weight.float().cpu()
            q = gptq_quantize(w, h, config) if method == "gptq" else rtn_quantize(w, config)
            packed = pack_layer(q.codes, q.scales, q.zeros, q.g_idx, config.bits)
            stored = dequantize(packed["qweight"], packed["qzeros"], packed["scales"].float(),
                                packed["g_idx"], config.bits).t()  # the weight as saved
            errors[name] = output_error(w, stored, h)
            if method == "gptq":
                rtn_errors[name] = output_error(w, rtn_quantize(w, config).dequantize(), h)
            weight.copy_(stored)
            tensors[name] = packed
    return tensors, errors, rtn_errors


def quantize_layer_linears(layer, states: list, passes: list[Pass], config: GPTQConfig,
                           method: str, true_sequential: bool) -> tuple[dict, dict, dict]:
    """Quantize a decoder layer's linears (`quantize_layer`'s results): all from one pass
    of the unquantized layer, or with `true_sequential` one linear at a time, each one's
    Hessian from a pass in which the linears before it are already quantized."""
    tensors, errors, rtn_errors = {}, {}, {}
    for names in ([(name,) for name in LINEARS] if true_sequential else [LINEARS]):
        hessians = collect_hessians(layer, states, passes, names)
        for total, part in zip((tensors, errors, rtn_errors),
                               quantize_layer(layer, hessians, config, method)):
            total.update(part)
    return tensors, errors, rtn_errors


@torch.inference_mode()
def quantize_model(net, windows: list[list[int]], config: GPTQConfig, method: str,
                   device: torch.device, progress: bool = True,
                   true_sequential: bool = False) -> tuple[dict, list[dict]]:
    """Quantize every decoder layer of `net` in order. Returns the checkpoint tensors of
    the quantized linears (by full name) and a log entry per layer."""
    mc = net.config
    ids = torch.tensor(windows, device=device)
    passes = make_passes(len(windows), ids.shape[1], mc, device)
    states = [(net.model.embed_tokens(chunk.reshape(-1)), None)
              for chunk in ids.split(SEQS_PER_PASS)]
    tensors, log = {}, []
    bar = tqdm(net.model.layers, desc=f"{method.upper()} layers", unit="layer",
               disable=not progress)
    for i, layer in enumerate(bar):
        start = time.perf_counter()
        packed, errors, rtn_errors = quantize_layer_linears(
            layer, states, passes, config, method, true_sequential and method == "gptq")
        states = run_layer(layer, states, passes)
        tensors.update({f"model.layers.{i}.{name}": t for name, t in packed.items()})
        seconds = time.perf_counter() - start
        log.append(dict(layer=i, seconds=round(seconds, 3), errors=errors,
                        **(dict(rtn_errors=rtn_errors) if rtn_errors else {})))
        worst = max(errors, key=errors.get)
        bar.write(f"layer {i:3d}: {seconds:6.2f} s  mean error {sum(errors.values()) / len(errors):.3e}"
                  f"  worst {worst} {errors[worst]:.3e}")
    return tensors, log


# --- the output folder ---------------------------------------------------------------------

def source_config(model: str, path: Path | None) -> dict:
    """The model's config.json as a dict (a dummy model's: its built-in one)."""
    if path is None:
        cfg = DUMMY_CONFIGS[model[len(DUMMY_PREFIX):]]
        return dict(cfg, architectures=[_ARCHITECTURES[cfg["model_type"]]])
    return json.loads((path / "config.json").read_text())


def checkpoint_dtype(path: Path | None) -> torch.dtype:
    """The dtype the model's safetensors store (float32 for a dummy model)."""
    if path is None:
        return torch.float32
    file = sorted(path.glob("*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as f:
        first = next(iter(f.keys()))
        return _DTYPES.get(f.get_slice(first).get_dtype(), torch.float32)


def checkpoint_tensors(net, quantized: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything `model.safetensors` holds: the packed linears (and their biases) and
    every other parameter in `dtype` (a tied lm_head is the embeddings: listed once)."""
    out = {}
    for name, tensor in checkpoint_layout(net).items():  # shared parameters come once
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            continue
        out[name] = tensor.detach().to("cpu", dtype).contiguous()
    for module, packed in quantized.items():
        out.update({f"{module}.{key}": t.cpu().contiguous() for key, t in packed.items()})
    return out


def write_folder(out: Path, tensors: dict, hf_config: dict, config: GPTQConfig,
                 source: Path | None, dtype: torch.dtype, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()  # --force: old weights beside the new ones would be loaded too
    if source is not None:  # tokenizer, chat template, generation config
        for file in sorted(source.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.name != "config.json" \
                    and not file.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(file, out / file.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(hf_config, quantization_config=config.to_dict())
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "quantize_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out / "quantize_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --- the command line -------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.quantize",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), dummy:NAME, or a local HF folder")
    p.add_argument("--out", required=True, help="the folder to write the checkpoint to")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (its *.safetensors are replaced)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                   help="gptq (error-compensating, default) or rtn (round to nearest)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=64,
                   help="input columns per scale/zero group; -1: one group per row "
                        "(default %(default)s)")
    p.add_argument("--desc-act", action="store_true",
                   help="act-order: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grid (zero point 2^(bits-1)); --no-sym: asymmetric")
    p.add_argument("--asym", dest="sym", action="store_false", help="same as --no-sym")
    p.add_argument("--true-sequential", action="store_true",
                   help="GPTQ: quantize a layer's linears one after the other, each from "
                        "inputs that the ones before it already quantized")
    p.add_argument("--damp-percent", type=float, default=0.01,
                   help="dampening added to H's diagonal, as a fraction of its mean")
    p.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--calibration-file", help="a UTF-8 text file to calibrate on instead of "
                                              "the standard library's docstrings")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--eval", action="store_true",
                   help="then print the perplexity of the model and of the checkpoint on "
                        "the held-out text (`python -m m7_gptq.eval_ppl`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args, mc: ModelConfig, hf_config: dict, out: Path) -> GPTQConfig:
    """The GPTQConfig the arguments ask for; QuantizeError naming what is wrong."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise QuantizeError(f"--out: {out} exists and is not an empty folder "
                            "(--force writes into it)")
    if "quantization_config" in hf_config or getattr(mc, "quantization_config", None):
        raise QuantizeError(f"--model: {args.model} is already quantized")
    if args.num_samples < 1 or args.seq_len < 2:
        raise QuantizeError("--num-samples must be >= 1 and --seq-len >= 2")
    if args.seq_len > mc.max_position_embeddings:
        raise QuantizeError(f"--seq-len: {args.seq_len} exceeds the model's "
                            f"max_position_embeddings ({mc.max_position_embeddings})")
    if not 0 <= args.damp_percent < 1:
        raise QuantizeError(f"--damp-percent must be in [0, 1), got {args.damp_percent}")
    try:
        config = GPTQConfig(bits=args.bits, group_size=args.group_size,
                            desc_act=args.desc_act, sym=args.sym,
                            damp_percent=args.damp_percent)
        for in_f, out_f in _linear_shapes(mc):  # the engine's own shape check
            GPTQLinear(in_f, out_f, False, config, torch.float32)
    except ValueError as exc:
        raise QuantizeError(f"--bits/--group-size: {exc}") from exc
    return config


def _linear_shapes(mc: ModelConfig) -> set[tuple[int, int]]:
    h, d, i = mc.hidden_size, mc.head_dim, mc.intermediate_size
    q, kv = mc.num_attention_heads * d, mc.num_key_value_heads * d
    return {(h, q), (h, kv), (q, h), (h, i), (i, h)}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _quantize(args)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _quantize(args) -> int:
    out = Path(args.out).expanduser()
    try:
        mc = load_model_config(args.model)
        path = resolve_model_path(args.model)
    except ValueError as exc:
        raise QuantizeError(str(exc)) from exc
    hf_config = source_config(args.model, path)
    config = check_args(args, mc, hf_config, out)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    origin = provenance(args.argv, device.type, tool="quantize")  # the code as it starts
    tokenizer = get_tokenizer(path, mc.vocab_size, (mc.eos_token_ids or [None])[0])
    try:
        windows = calibration.get_windows(tokenizer, args.num_samples, args.seq_len,
                                          text_file=args.calibration_file)
    except ValueError as exc:
        raise QuantizeError(f"calibration: {exc}") from exc
    net = load_model(args.model, mc, torch.float32, device)
    start = time.perf_counter()
    quantized, layers = quantize_model(net, windows, config, args.method, device,
                                       progress=not args.no_progress,
                                       true_sequential=args.true_sequential)
    seconds = time.perf_counter() - start
    dtype = checkpoint_dtype(path)
    log = dict(origin, model=args.model, method=args.method,
               quantization_config=config.to_dict(),
               num_samples=args.num_samples, seq_len=args.seq_len,
               true_sequential=args.true_sequential,
               calibration=args.calibration_file or "stdlib:calibration",
               seconds=round(seconds, 2), device=str(device), layers=layers)
    write_folder(out, checkpoint_tensors(net, quantized, dtype), hf_config, config, path,
                 dtype, log)
    print(f"{args.method.upper()}: {len(quantized)} linear layers quantized to {config.bits} "
          f"bits in {seconds:.1f} s; wrote {out}")
    if args.eval:
        from .eval_ppl import main as eval_main
        return eval_main(["--model", args.model, "--model", str(out)]
                         + (["--no-progress"] if args.no_progress else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
