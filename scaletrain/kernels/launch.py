"""Launch geometry shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(n_rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) for kernels that reduce per-column partial sums over rows. Two programs
    per SM keep the GPU busy while the (programs, cols) fp32 partials stay small; under the CPU interpreter
    a handful of programs still exercises the cross-program sum."""
    if device.type == "cuda":
        target = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    rows_per_program = -(-n_rows // max(min(target, n_rows), 1))
    programs = -(-n_rows // rows_per_program) if n_rows else 1
    return programs, max(rows_per_program, 1)
