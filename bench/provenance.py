"""Where a measurement came from: command line, git commit, machine, versions.

Introduced with M4's kernel benchmark. `bench/attention_kernels.py` and `tools/profile_step.py`
write results files with the same provenance fields as `bench/compare.py`'s (command,
git_commit, git_dirty, date, machine, versions); this module builds them from
compare.py's own helpers (`git_info`, `cpu_name`, `_version`) and adds what a kernel
number needs besides: the GPU's streaming-multiprocessor count and the CUDA version.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import socket

from bench.compare import _version, cpu_name, git_info


def machine_info(device: str = "cuda") -> dict:
    """GPU name and SM count (None off CUDA), CPU name, core count, host name."""
    gpu = sm_count = memory = None
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu, sm_count = torch.cuda.get_device_name(0), props.multi_processor_count
            memory = props.total_memory
    return {"gpu": gpu, "sm_count": sm_count, "gpu_memory_bytes": memory, "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "hostname": socket.gethostname()}


def versions() -> dict:
    """python, torch, triton, CUDA (torch's build), transformers, numpy."""
    import torch

    triton = _version("triton")
    if triton is None:
        try:
            import triton as _triton

            triton = _triton.__version__
        except ImportError:
            pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton, "cuda": torch.version.cuda,
            "transformers": _version("transformers"), "numpy": _version("numpy")}


def provenance(prog: str, argv: list[str], device: str = "cuda") -> dict:
    """The fields every results file opens with; `prog` is how the command was run
    (e.g. "python3 bench/attention_kernels.py"), `argv` its arguments."""
    commit, dirty = git_info()
    return {"command": shlex.join([*shlex.split(prog), *argv]),
            "git_commit": commit, "git_dirty": dirty,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(device), "versions": versions()}


def format_table(headers: list[str], rows: list[list], width: int = 120) -> str:
    """A plain-text table: columns right-aligned (the first left-aligned), cells as
    given (None shows as '-'); a cell that would push a line past `width` columns is cut
    to fit."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0:  # shrink the widest column until the line fits
        i = max(range(len(widths)), key=widths.__getitem__)
        cut = min(excess, widths[i] - max(4, len(headers[i]) // 2))
        if cut <= 0:
            break
        widths[i] -= cut
        excess -= cut

    def line(row: list[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            cell = cell if len(cell) <= w else cell[:w - 1] + "~"
            out.append(cell.ljust(w) if i == 0 else cell.rjust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in cells])
