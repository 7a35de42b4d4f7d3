"""M4 · flash attention: the online softmax, flash-decoding's merge, a program finding its
sequence on the device, and which CUDA graph a step replays."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m4.1", "the online softmax: fold one tile of keys in",
        ("ops/paged_attention.py::_online_softmax_step",),
        "medium",
        "Attention reads the keys tile by tile where they lie in the paged cache, never "
        "a whole row of scores: a running max, sum and output, rescaled as the max grows, "
        "give the exact softmax at the end.",
        "scores = q @ k^T * qk_scale (tl.dot, input_precision=PRECISION; log2 units: exp2),\n"
        "-inf where not visible. new max = max(running_max, row max); p = exp2(scores - it),\n"
        "rescale sum and acc by exp2(running_max - new max), add p's sum and p @ v.\n"
        "A row that saw nothing yet keeps max -inf: use 0 in its place (no nan)."),
    Exercise(
        "m4.2", "flash-decoding: merge the splits by log-sum-exp",
        ("ops/paged_attention.py::_paged_decode_kernel",
         "ops/paged_attention.py::_merge_splits_kernel"),
        "hard",
        "One decode's keys are cut into splits so that even a single long sequence keeps "
        "many programs busy; each split's softmax is normalized on its own, and its "
        "log-sum-exp is what lets them be put back together exactly.",
        "decode kernel: lse = running_max + log2(running_sum), base 2; -inf if running_sum\n"
        "is 0. merge: load the splits' lse (split_ok, else -inf) and outputs [splits, dims];\n"
        "weights = exp2(lse - max lse) (max -inf: use 0); out = sum(w * part) / sum(w)\n"
        "(sum 0: divide by 1); store it at row q_start, only for a decode (is_decode)."),
    Exercise(
        "m4.3", "which sequence a program takes, found on the device",
        ("ops/paged_attention.py::_sequence_of_program",),
        "medium",
        "The varlen kernel's grid depends only on the step's token and sequence counts, "
        "so one CUDA graph fits every mix of lengths: each program finds its own sequence "
        "from query_start_loc.",
        "Return the last seq in [0, num_seqs) with _first_tile(query_start_ptr, seq,\n"
        "BLOCK_M) <= program (first tiles grow with seq): binary search, low = 0 and\n"
        "high = num_seqs, keeping _first_tile(low) <= program < _first_tile(high)."),
    Exercise(
        "m4.4", "the CUDA graphs' step sizes, and which one a step uses",
        ("worker/cuda_graph.py::graph_token_sizes", "worker/cuda_graph.py::padded_size"),
        "easy",
        "A graph replays fixed shapes: a step is padded up to the next captured size, so a "
        "few sizes must cover every step up to the largest; a larger step runs eager.",
        "graph_token_sizes: 1, 2, 4, 8, every 16 to 256, every 64 to 512, every 256 to\n"
        "LARGEST_GRAPH_TOKENS, and max_batch_size; keep those below the largest =\n"
        "min(max_num_tokens, LARGEST_GRAPH_TOKENS), add it; sorted, no repeats.\n"
        "padded_size: the smallest size >= num_tokens, None if there is none."),
]
