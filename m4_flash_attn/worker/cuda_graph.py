"""CUDA graphs for decode steps: a whole forward pass replayed with one launch.

Introduced in M4. A decode step of a 24-layer model launches hundreds of small kernels;
launched one by one from Python, the GPU finishes each long before the host has issued
the next, and waits. A CUDA graph records the kernels of one forward pass once (their
arguments, the memory they read and write) and replays all of them with one call.

What a graph fixes is everything it recorded: the kernels, their grid sizes, and the
addresses of their inputs and outputs. So

- the inputs live in buffers allocated once (`worker/input_batch.py`'s device buffers:
  token ids, positions, slot mapping, sequence lengths, block tables); a step copies its
  values into them and replays;
- the batch size is fixed: a graph is captured for each of a few batch sizes (1, 2, 4,
  8, then every 16 up to `max_batch_size`, at most 256) and a batch is padded to the
  next one (the padding rows write nowhere and read no keys). Eager decode steps are
  padded the same way, so a graph and its eager run compute the very same thing;
- anything decided on the host at capture time stays as it was: the attention backend
  must take its metadata from device buffers (the Triton kernels do; the torch
  reference builds index tensors on the host, so it runs eager), and the decode kernel's
  split count depends only on the batch size.

Capturing runs each batch size once to compile its kernels, then records it; the graphs
share one memory pool (largest first, so the smaller ones fit in its blocks). A graph
ends at the hidden states: the logits (a [batch, vocab] matrix) are computed after it,
outside the pool. The model runner counts the pool's size before it sizes the KV cache.
"""

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

LARGEST_GRAPH_BATCH = 256


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... up to max_batch_size (at
    most LARGEST_GRAPH_BATCH; larger batches run eager, where launches matter less)."""
    largest = min(max_batch_size, LARGEST_GRAPH_BATCH)
    sizes = [s for s in [1, 2, 4, 8] + list(range(16, largest + 1, 16)) if s < largest]
    return sizes + [largest]


class DecodeGraphs:
    """One captured decode forward pass per batch size, replayed on the same buffers."""

    def __init__(self, batch_sizes: list[int]) -> None:
        self.batch_sizes = sorted(batch_sizes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    @torch.inference_mode()  # no autograd graph: nothing kept alive beyond the step
    def capture(self, run_decode: Callable[[int], torch.Tensor],
                show_progress: bool = True) -> None:
        """Record `run_decode(size)` (batch size -> hidden states [size, hidden], read
        from the kept buffers) for every batch size. It is not kept afterwards: holding
        the model runner from here would keep the engine, and all its GPU memory, alive
        after it is dropped."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved()
        pool = None
        for size in tqdm(sorted(self.batch_sizes, reverse=True), desc="Capturing CUDA graphs",
                         unit="graph", disable=not show_progress):
            run_decode(size)  # compiles the kernels for this shape, outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = run_decode(size)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = torch.cuda.memory_reserved() - before

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph for `size` on what the buffers hold now; its hidden states."""
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden


def padded_batch_size(batch_sizes: list[int], num_seqs: int) -> int | None:
    """The smallest of `batch_sizes` that holds num_seqs (None: none does)."""
    return next((size for size in sorted(batch_sizes) if size >= num_seqs), None)
