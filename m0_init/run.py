"""`python -m m0_init.run`: load a model, show it, and run one forward pass.

Prints the resolved config, a model summary, the tokenized prompt and the ten most
likely next tokens with their probabilities.

Introduced in M0.
"""

import argparse
import dataclasses
import sys

from .llm import LLM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m0_init.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), dummy:NAME, or a local HF folder")
    p.add_argument("--prompt", default="The capital of France is", help="text to run")
    p.add_argument("--top-k", type=int, default=10, help="how many next tokens to show")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        token_ids = llm.encode(args.prompt)
        top = llm.next_token_distribution(token_ids, top_k=args.top_k)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runner, mc = llm.model_runner, llm.model_runner.model_config
    print("== config ==")
    for key, value in dataclasses.asdict(llm.config).items():
        print(f"  {key:16} {value}")
    n_params = sum(p.numel() for p in runner.model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    print("== model ==")
    print(f"  {mc.architecture}: {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
          f"{mc.num_attention_heads} heads ({mc.num_key_value_heads} KV), head_dim {mc.head_dim}")
    print(f"  {n_params / 1e6:.1f}M parameters, {runner.dtype}, {n_bytes / 2**20:.1f} MiB "
          f"on {runner.device}")
    print("== prompt ==")
    print(f"  {args.prompt!r} -> {len(token_ids)} tokens")
    pieces = [llm.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
    print("  " + " ".join(f"{t}:{p!r}" for t, p in zip(token_ids, pieces)))
    print(f"== top {args.top_k} next tokens ==")
    for token_id, text, prob in top:
        print(f"  {prob:7.2%}  {token_id:>7}  {text!r}  {'#' * round(prob * 40)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
