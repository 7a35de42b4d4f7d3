"""GPTQ weights: the checkpoint format, the quantization grid, the layers that run them.

A layer is stored as AutoGPTQ wrote it (format v1; v2 keeps z as it is): `qweight` (the
codes, packed along the input dimension), `qzeros` (each group's zero point minus one,
packed along the output dimension), `scales`, `g_idx` (each input row's group);
W[o, i] ~ (q[i, o] - z[g, o]) * s[g, o] with g = g_idx[i]. `GPTQLinear` holds them as
buffers in place of an `nn.Linear` (a merged q/k/v or gate/up: its parts' columns side
by side, when they share g_idx; else `GPTQParts`), puts its rows in group order after
loading, and runs the Triton kernels of `ops/gptq_gemm.py` on CUDA, or a plain matmul on
the dequantized weight on the CPU.

Introduced in M7.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ....ops.gptq_pack import dequantize, pack, unpack  # noqa: F401 (the format's layout)

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# The linear layers of a decoder layer that a GPTQ checkpoint quantizes (lm_head is not).
# q/k/v and gate/up are merged layers (M4): one GPTQ layer each, its parts side by side.
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class GPTQConfig:
    """The settings a GPTQ checkpoint was written with (`quantize_config.json`)."""

    bits: int = 4
    group_size: int = 64  # input rows per group; -1: one group per output channel
    desc_act: bool = False  # act-order: columns quantized by decreasing Hessian diagonal
    sym: bool = True  # symmetric: every zero point is 2^(bits - 1)
    damp_percent: float = 0.01  # the quantizer's dampening (recorded, not used to load)
    checkpoint_format: str = "gptq"  # how zeros are stored: "gptq" (v1) z - 1, "gptq_v2" z

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config.bits: {self.bits!r} is not supported; "
                             f"this engine loads GPTQ checkpoints of {SUPPORTED_BITS} bits")
        if not (self.group_size == -1 or (isinstance(self.group_size, int)
                                          and self.group_size > 0)):
            raise ValueError("quantization_config.group_size: must be -1 (per channel) or "
                             f"a positive number of rows, got {self.group_size!r}")
        for name in ("desc_act", "sym"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantization_config.{name}: must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format: "
                             f"{self.checkpoint_format!r} is not supported; this engine loads "
                             f"{' and '.join(CHECKPOINT_FORMATS)} ('gptq' is v1: zeros stored "
                             "minus one, as AutoGPTQ wrote them; 'gptq_v2' stores them as they "
                             "are)")

    @property
    def pack_factor(self) -> int:
        """Codes per int32."""
        return 32 // self.bits

    @property
    def max_code(self) -> int:
        return 2 ** self.bits - 1

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point to get z: 1 in v1, 0 in v2."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def rows_per_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_dict(cls, cfg: dict) -> "GPTQConfig":
        """Read `quantization_config` (config.json) or `quantize_config.json`; refuse what
        this engine cannot load, naming the setting."""
        method = cfg.get("quant_method", "gptq")
        if method != "gptq":
            raise ValueError(f"quantization_config.quant_method: {method!r} is not "
                             "supported; this engine loads GPTQ checkpoints only")
        if cfg.get("lm_head", False):
            raise ValueError("quantization_config.lm_head: a quantized lm_head is not "
                             "supported; this engine keeps lm_head in the model dtype")
        return cls(bits=cfg.get("bits", 4), group_size=cfg.get("group_size", 128),
                   desc_act=cfg.get("desc_act", False), sym=cfg.get("sym", True),
                   damp_percent=cfg.get("damp_percent", 0.01),
                   checkpoint_format=cfg.get("checkpoint_format", "gptq"))

    def to_dict(self) -> dict:
        """`quantize_config.json`, and `quantization_config` in config.json."""
        return dict(quant_method="gptq", bits=self.bits, group_size=self.group_size,
                    desc_act=self.desc_act, sym=self.sym, damp_percent=self.damp_percent,
                    checkpoint_format=self.checkpoint_format, lm_head=False)


def read_quantization_config(folder: Path, hf_config: dict) -> GPTQConfig | None:
    """The folder's GPTQ settings: config.json's `quantization_config`, else a
    `quantize_config.json` beside it; None for an unquantized model."""
    cfg = hf_config.get("quantization_config")
    if cfg is None and (folder / "quantize_config.json").is_file():
        cfg = json.loads((folder / "quantize_config.json").read_text())
    return None if cfg is None else GPTQConfig.from_dict(cfg)


# --- the grid: W ~ (q - z) * s ----------------------------------------------------------

def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` ([rows, n]) for a `bits`-bit grid covering the
    row's range (and 0). Asymmetric: z in [1, 2^bits - 1] (format v1 stores z - 1, so
    z = 0 cannot be written: a row with no negative weight loses its top step, its
    largest code standing for (2^bits - 2) steps). Symmetric: z = 2^(bits - 1) and the
    grid runs from -max|w| to (2^(bits-1) - 1) / 2^(bits-1) of +max|w| (the top code is
    one short, as in AutoGPTQ)."""
    # exercise m7.3 begin
    max_code = 2 ** bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    if sym:
        zero = torch.full_like(scale, (max_code + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(1, max_code)
    return scale, zero
    # exercise m7.3 end


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bits: int) -> torch.Tensor:
    """Round `w` ([rows, n]) to its grid (scale, zero per row): integer codes (as floats)."""
    # exercise m7.3 begin
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
    # exercise m7.3 end


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # exercise m7.3 begin
    return (codes - zero[:, None]) * scale[:, None]
    # exercise m7.3 end


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """A quantized layer's checkpoint tensors from its codes `[out, in]`, scales and zeros
    `[groups, out]` and g_idx `[in]` (the layer's bias, if any, is saved beside them)."""
    return dict(qweight=pack(codes.t().to(torch.int32), bits, dim=0),
                qzeros=pack((zeros.to(torch.int32) - 1), bits, dim=1),
                scales=scales.to(torch.float16).contiguous(),
                g_idx=g_idx.to(torch.int32).contiguous())


def round_to_nearest(weight: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest (RTN): each group of input rows of `weight` ([out, in]) on its own
    grid, nothing compensated. (codes [out, in], scales [groups, out], zeros [groups,
    out], g_idx [in]): the baseline GPTQ is compared with."""
    w = weight.float()
    rows = config.rows_per_group(w.shape[1])
    codes, scales, zeros = torch.empty_like(w), [], []
    for start in range(0, w.shape[1], rows):
        block = w[:, start:start + rows]
        scale, zero = fit_grid(block, config.bits, config.sym)
        codes[:, start:start + rows] = to_codes(block, scale, zero, config.bits)
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(w.shape[1]) // rows).to(torch.int32)
    return codes, torch.stack(scales), torch.stack(zeros), g_idx


def rtn_layer(weight: torch.Tensor, config: GPTQConfig) -> dict[str, torch.Tensor]:
    """`round_to_nearest` as checkpoint tensors: how a dummy model gets quantized
    weights."""
    return pack_layer(*round_to_nearest(weight, config), config.bits)


# --- the layer ----------------------------------------------------------------------------

class GPTQLinear(nn.Module):
    """A linear layer whose weight is GPTQ-quantized: y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 config: GPTQConfig, dtype: torch.dtype,
                 shards: dict[str, int] | None = None) -> None:
        super().__init__()
        if shards is not None and (sum(shards.values()) != out_features
                                   or any(n % config.pack_factor for n in shards.values())):
            raise ValueError(f"quantization: the parts {shards} of a merged layer must add up "
                             f"to {out_features} columns, each a multiple of "
                             f"{config.pack_factor}")
        self.shards = shards  # a merged layer's parts (checkpoint names: output columns)
        rows = config.rows_per_group(in_features)
        pf = config.pack_factor
        if rows % 16:  # the kernels' smallest tile of K (tl.dot's)
            raise ValueError(f"quantization_config.group_size: groups of {rows} rows are "
                             "not supported; the kernels need a multiple of 16")
        if in_features % pf or out_features % pf or in_features % rows:
            raise ValueError(
                f"quantization: a {in_features} x {out_features} linear layer cannot hold "
                f"{config.bits}-bit GPTQ weights in groups of {config.group_size} (both "
                f"sizes must be multiples of {pf}, the input size a multiple of the group)")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        groups = in_features // rows
        # The checkpoint's tensors, as buffers (not trained: .to() and state_dict() carry them)
        self.register_buffer("qweight", torch.empty(in_features // pf, out_features,
                                                    dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // pf,
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        # Set by prepare(), what the kernels and the CPU path read; not saved.
        self.register_buffer("input_perm", None, persistent=False)  # act-order: x[:, perm]
        self.register_buffer("weight", None, persistent=False)  # CPU: dequantized [out, in]
        self.prepared = False  # rows in group order: the kernels may run
        # state_dict() gives the checkpoint's row order back; load_state_dict() drops what
        # prepare() made of the old tensors
        self.register_state_dict_post_hook(_rows_in_checkpoint_order)
        self.register_load_state_dict_post_hook(_unprepare)

    def shard_tensors(self, shard: str) -> dict[str, torch.Tensor]:
        """What the checkpoint's tensors of part `shard` fill: its columns of the codes,
        zeros (packed along the columns), scales and bias; g_idx is the parts' shared one."""
        start = 0
        for name, columns in self.shards.items():
            if name == shard:
                break
            start += columns
        cols, pf = slice(start, start + columns), self.config.pack_factor
        tensors = dict(qweight=self.qweight[:, cols], scales=self.scales[:, cols],
                       qzeros=self.qzeros[:, start // pf:(start + columns) // pf],
                       g_idx=self.g_idx)
        if self.bias is not None:
            tensors["bias"] = self.bias[cols]
        return tensors

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, bits={c.bits}, "
                f"group_size={c.group_size}, desc_act={c.desc_act}, sym={c.sym}")

    @torch.no_grad()
    def prepare(self) -> None:
        """After loading: rows in group order (act-order's permutation kept for the input),
        and on the CPU the dequantized weight."""
        bits, rows = self.config.bits, self.config.rows_per_group(self.in_features)
        g_idx = self.g_idx.long()
        in_order = torch.arange(self.in_features, device=g_idx.device) // rows
        if not torch.equal(g_idx, in_order):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], in_order):
                raise ValueError("quantization: g_idx does not put group_size rows in "
                                 f"each group ({self.extra_repr()})")
            codes = unpack(self.qweight.data, bits, dim=0)[perm]
            self.qweight.data = pack(codes.cpu(), bits, dim=0).to(self.qweight.device)
            self.g_idx.data = in_order.to(torch.int32)
            self.input_perm = perm
        self._check_zeros_match_the_format()
        if self.scales.device.type == "cpu":
            self.weight = dequantize(self.qweight, self.qzeros, self.scales, self.g_idx,
                                     bits, self.config.zero_offset).t().contiguous()
        else:  # the kernels' scratch counters, made now rather than in a graph capture
            from ....ops.gptq_gemm import split_counters
            split_counters(self.scales.device)
        self.prepared = True

    def _check_zeros_match_the_format(self) -> None:
        """A symmetric layer's zero points are all 2^(bits - 1): v1 stores them minus one.
        Stored as they are under a v1 label, they are a v2 checkpoint mislabelled, whose
        every weight would come out one step off: refused."""
        c = self.config
        stored = unpack(self.qzeros, c.bits, dim=1)
        if c.sym and c.checkpoint_format == "gptq" and bool((stored == 2 ** (c.bits - 1)).all()):
            raise ValueError(
                f"quantization_config.checkpoint_format: 'gptq' (v1) stores a symmetric "
                f"zero point minus one ({2 ** (c.bits - 1) - 1}), but every stored zero here "
                f"is {2 ** (c.bits - 1)}: this looks like a 'gptq_v2' checkpoint labelled v1 "
                "(set checkpoint_format to 'gptq_v2' in its quantization config if it is)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:  # rows not in group order: the kernels would be wrong
            raise RuntimeError(f"GPTQLinear ({self.extra_repr()}): call prepare() after "
                               "loading its tensors, before running it")
        if self.input_perm is not None:
            x = x[..., self.input_perm]
        if self.weight is not None:  # the CPU reference
            return F.linear(x, self.weight, self.bias)
        # imported here: Triton may be imported only after ops/ has chosen whether it
        # runs compiled or interpreted
        from ....ops.gptq_gemm import gptq_matmul  # the kernels, on CUDA
        y = gptq_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales,
                        self.qzeros, self.config.rows_per_group(self.in_features),
                        self.config.bits, self.bias, self.config.zero_offset)
        return y.reshape(*x.shape[:-1], self.out_features)


def _rows_in_checkpoint_order(layer: GPTQLinear, state_dict: dict, prefix: str,
                              local_metadata) -> None:
    """state_dict() of an act-order layer after prepare(): its rows put back in the
    checkpoint's order (qweight and g_idx as loaded), since the permutation that prepare()
    applied is not saved. Before prepare() (when a loader fills the tensors that
    state_dict(keep_vars=True) gives) there is nothing to undo."""
    if layer.input_perm is None:
        return
    back = torch.argsort(layer.input_perm)  # checkpoint row r is prepared row back[r]
    codes = unpack(layer.qweight, layer.config.bits, dim=0)[back]
    state_dict[prefix + "qweight"] = pack(codes.cpu(), layer.config.bits, dim=0).to(
        layer.qweight.device)
    state_dict[prefix + "g_idx"] = layer.g_idx[back].contiguous()


def _unprepare(layer: GPTQLinear, incompatible_keys) -> None:
    """After load_state_dict: what prepare() made of the old tensors is dropped (prepare()
    makes it again from the new ones), so a forward before that fails loudly instead of
    computing with a stale permutation or a stale dequantized weight."""
    layer.input_perm = layer.weight = None
    layer.prepared = False


def checkpoint_tensors(layer: GPTQLinear) -> dict[str, torch.Tensor]:
    """The layer's tensors that a checkpoint holds (its saved buffers), by name."""
    return dict(layer.state_dict(keep_vars=True))


class GPTQParts(nn.Module):
    """A merged layer whose parts have g_idx of their own in the checkpoint (act-order
    permutations that differ): each part its own GPTQLinear, the results side by side."""

    def __init__(self, parts: dict[str, GPTQLinear]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.shards = {name: part.out_features for name, part in parts.items()}

    def shard_tensors(self, shard: str) -> dict[str, torch.Tensor]:
        return checkpoint_tensors(self.parts[shard])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts.values()], dim=-1)


def _parts_share_g_idx(parent: str, shards: dict, g_idx: dict | None) -> bool:
    """Whether the checkpoint's g_idx of a merged layer's parts are one (no checkpoint:
    they are, a dummy model's being rounded in order)."""
    if g_idx is None:
        return True
    first, *rest = (g_idx.get(f"{parent}.{shard}.g_idx") for shard in shards)
    return all(first is not None and t is not None and torch.equal(first, t) for t in rest)


def quantize_linear_layers(model: nn.Module, config: GPTQConfig, round_weights: bool = False,
                           g_idx: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Swap each quantized linear layer of `model` (see QUANTIZED_LINEARS) for a GPTQLinear
    of the same shape, dtype and device. Empty, ready for a checkpoint's tensors; or, with
    `round_weights`, holding the layer's own weights rounded to the grid (`rtn_layer`: how
    a dummy model gets quantized weights). A merged layer stays one GPTQLinear when its
    parts share the checkpoint's `g_idx` ({name: tensor}), else it becomes GPTQParts.
    lm_head and the embeddings stay as they are. Returns the names of the swapped layers."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS):
            continue
        weight, shards = module.weight, getattr(module, "shards", None)
        parent_name, _, child = name.rpartition(".")
        bias = module.bias is not None
        with torch.device(weight.device):
            if shards is None or _parts_share_g_idx(parent_name, shards, g_idx):
                layer = GPTQLinear(module.in_features, module.out_features, bias, config,
                                   weight.dtype, shards)
            else:
                layer = GPTQParts({part: GPTQLinear(module.in_features, columns, bias,
                                                    config, weight.dtype)
                                   for part, columns in shards.items()})
        if round_weights:
            with torch.no_grad():
                for key, tensor in rtn_layer(weight.data, config).items():
                    getattr(layer, key).copy_(tensor)
                if module.bias is not None:
                    layer.bias.copy_(module.bias)
        setattr(model.get_submodule(parent_name), child, layer)
        swapped.append(name)
    return swapped


def prepare_quantized_layers(model: nn.Module) -> None:
    """After loading: each GPTQLinear puts its rows in group order (see `prepare`)."""
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.prepare()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """What the weights take: `quantized` (every tensor the GPTQ layers keep, packed
    codes, scales, zeros, g_idx and any act-order permutation), `dense` (those layers'
    weights at the model dtype's size, the same shapes unquantized), and `total` (the
    whole model, shared tensors once: embeddings, norms and lm_head included; on the
    CPU also the dequantized copies the reference path runs)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    quantized = dense = 0
    for layer in model.modules():
        if isinstance(layer, GPTQLinear):
            kept = [layer.qweight, layer.qzeros, layer.scales, layer.g_idx]
            if layer.input_perm is not None:
                kept.append(layer.input_perm)
            quantized += sum(t.numel() * t.element_size() for t in kept)
            dense += layer.in_features * layer.out_features * layer.scales.element_size()
    return dict(quantized=quantized, dense=dense, total=total)
