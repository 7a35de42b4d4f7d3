"""CUDA graphs for whole steps: a forward pass's hundreds of kernels replayed with one launch.

A graph fixes what it recorded (kernels, grids, buffer addresses): a step's inputs live
in buffers allocated once (`worker/input_batch.py`), and a graph is captured per step
size in tokens (1, 2, 4, 8, every 16 to 256, every 64 to 512, every 256 to 2048, up to
the config's `max_graph_tokens`, and `max_batch_size`), once for steps of decodes only
(the decode kernel alone) and once for the others. A step is padded to the next size with
tokens that write nowhere and empty sequences (eager steps on CUDA too); a larger one
runs eager. The kernels find each sequence's work on the device, so one graph fits every
mix of its size. The graphs share one memory pool; logits are computed after them.

Introduced in M4.
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
    # exercise m4.4 begin
    largest = min(max_num_tokens, LARGEST_GRAPH_TOKENS)
    steps = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(320, 513, 64)) \
        + list(range(768, LARGEST_GRAPH_TOKENS + 1, 256)) + [max_batch_size]
    return sorted({s for s in steps if s < largest} | {largest})
    # exercise m4.4 end


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
    # exercise m4.4 begin
    return next((size for size in sorted(sizes) if size >= num_tokens), None)
    # exercise m4.4 end
