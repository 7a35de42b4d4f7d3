"""A linear layer that runs several of the checkpoint's projections as one GEMM.

q, k and v read the same input, and so do gate and up: with their weights stacked row
by row, one matrix multiply (one kernel, one pass over the input) does the work of three
or two. The checkpoint still stores each projection on its own: `shards` names them in
order with their output sizes, and `shard_tensors` gives the slices of the parameters
that one of them fills. The model loader knows a merged layer by its `shards`.

Introduced in M4.
"""

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """nn.Linear whose output rows are the checkpoint's `shards` ({name: rows}), stacked."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards = dict(shards)

    def shard_rows(self, shard: str) -> slice:
        """The output rows (or columns of the result) that `shard` owns."""
        start = 0
        for name, rows in self.shards.items():
            if name == shard:
                return slice(start, start + rows)
            start += rows
        raise KeyError(shard)

    def shard_tensors(self, shard: str) -> dict[str, torch.Tensor]:
        """What the checkpoint's `shard.weight` (and `shard.bias`) fill: views of rows."""
        rows = self.shard_rows(shard)
        return {name: p[rows] for name, p in self.named_parameters(recurse=False)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shards={self.shards}"
