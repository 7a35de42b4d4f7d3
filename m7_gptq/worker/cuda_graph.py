"""CUDA graphs for whole steps: a forward pass replayed with one launch.

Introduced in M4 for decode steps; M5 captures steps by their number of tokens, so that
steps mixing decodes with chunks of prompts replay a graph too. A step of a 24-layer
model launches hundreds of small kernels; launched one by one from Python, the GPU
finishes each long before the host has issued the next, and waits. A CUDA graph records
the kernels of one forward pass once (their arguments, the memory they read and write)
and replays all of them with one call.

What a graph fixes is everything it recorded: the kernels, their grid sizes, and the
addresses of their inputs and outputs. So

- the inputs live in buffers allocated once (`worker/input_batch.py`'s device buffers:
  token ids, positions, slot mapping, query start locations, sequence lengths, block
  tables); a step copies its values into them and replays;
- the shape is fixed: a graph is captured for each of a few token counts (M5; M4 had
  batch sizes of decodes): 1, 2, 4, 8, every 16 up to 256, every 64 up to 512, every
  256 up to 2048, at most `max_num_batched_tokens`, and `max_batch_size`; twice up to
  `max_batch_size`, once for steps of decodes only (one new token per sequence: the
  decode kernel alone) and once for steps with prompts or chunks (both kernels). A step
  is padded to the next size: its tokens with padding tokens that write nowhere, its
  sequences with empty ones, up to `min(tokens, max_batch_size)`, the most a step of
  that many tokens can hold. Eager
  steps on CUDA are padded the same way, so a graph and its eager run compute the very
  same thing. A step larger than the largest graph (a whole long prompt, with chunked
  prefill off) runs eager: its kernels are long enough that launching them costs little;
- anything decided on the host at capture time stays as it was: the attention backend
  must take its metadata from device buffers and find each sequence's work on the
  device (the Triton kernels do, M5: whatever the mix of decodes and chunks; the torch
  reference builds index tensors on the host, so it runs eager), and the decode
  kernel's split count depends only on the number of sequences.

Capturing runs each size once to compile its kernels, then records it; the graphs share
one memory pool (largest first, so the smaller ones fit in its blocks). A graph ends at
the hidden states: the logits (a [sequences, vocab] matrix) are computed after it,
outside the pool. The model runner counts the pool's size before it sizes the KV cache.
"""

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

LARGEST_GRAPH_TOKENS = 2048


def graph_token_sizes(max_num_tokens: int, max_batch_size: int) -> list[int]:
    """The step sizes (tokens) to capture, up to max_num_tokens (at most
    LARGEST_GRAPH_TOKENS; larger steps run eager, where launches matter less), and
    max_batch_size itself: the largest step of decodes only is padded to no more."""
    largest = min(max_num_tokens, LARGEST_GRAPH_TOKENS)
    steps = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(320, 513, 64)) \
        + list(range(768, LARGEST_GRAPH_TOKENS + 1, 256)) + [max_batch_size]
    return sorted({s for s in steps if s < largest} | {largest})


class StepGraphs:
    """One captured forward pass per step size (tokens) and kind (decodes only, or not),
    replayed on the same buffers."""

    def __init__(self, token_sizes: list[int], max_batch_size: int) -> None:
        self.token_sizes = sorted(token_sizes)
        # (tokens, decodes only): a step of decodes has a sequence per token; any other
        # step has at least two tokens
        self.keys = [(size, True) for size in self.token_sizes if size <= max_batch_size] \
            + [(size, False) for size in self.token_sizes if size >= 2]
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    @torch.inference_mode()  # no autograd graph: nothing kept alive beyond the step
    def capture(self, run_step: Callable[[int, bool], torch.Tensor],
                show_progress: bool = True) -> None:
        """Record `run_step(num_tokens, decodes_only)` (-> hidden states [num_tokens,
        hidden], read from the kept buffers) for every key. It is not kept afterwards: holding
        the model runner from here would keep the engine, and all its GPU memory, alive
        after it is dropped."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved()
        pool = None
        for key in tqdm(sorted(self.keys, reverse=True), desc="Capturing CUDA graphs",
                        unit="graph", disable=not show_progress):
            run_step(*key)  # compiles the kernels for this shape, outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = run_step(*key)
            pool = graph.pool()
            self.graphs[key] = (graph, hidden)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = torch.cuda.memory_reserved() - before

    def replay(self, size: int, decodes_only: bool) -> torch.Tensor:
        """Run the graph for this key on what the buffers hold now; its hidden states."""
        graph, hidden = self.graphs[size, decodes_only]
        graph.replay()
        return hidden


def padded_size(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest of `sizes` that holds num_tokens (None: none does)."""
    return next((size for size in sorted(sizes) if size >= num_tokens), None)
