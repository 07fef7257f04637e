"""The sparse GEMV on CPU: only the kept weight rows are read, as the Triton kernel reads them on a GPU.

A fused C++ kernel (cpu_kernel.cpp, built on first use into torch's extension cache by torch.utils.cpp_extension): per
token and group it compacts the kept inputs, then each of torch's threads streams the kept rows' segments of its own
range of columns into an accumulator in L1. It takes float32 weights, and quantized ones: group-wise 4-bit or 8-bit
(grouped.py's layout), summed over a group's kept rows and scaled once a group, and int8 with one scale per column.
At threshold 0 (dense decoding) it is the quantized weights' fast product too.

Where no compiler works, float weights' kept rows are summed by torch.embedding_bag instead (sparse_gemv_bags), and
group-wise quantized weights take grouped_sparse_gemv_cpu (every row read and dequantized a slab of columns at a time);
int8 ones with one scale per column take ops.sparse_gemv_reference.

y = sum over kept inputs k of x[k] * weight_t[k, :] is an embedding bag: rows of weight_t looked up by index, scaled by
per-sample weights and summed. PyTorch's CPU embedding_bag (FBGEMM) streams just those rows. Each group of columns
(q/k/v, gate/up) has its own kept rows: weight_t [K, N] is viewed as [K * N / unit, unit] rows of `unit` columns (the
groups' common divisor), and every unit of a group's columns is one bag over that group's kept rows. The one-token
path builds its bags in a handful of operations (one mask for all units, one nonzero, and the bag index, bag starts
and per-sample weights each in one operation): a step is thousands of them.
"""
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_gemv.quant import grouped_matmul

KERNEL_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
KERNEL_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's own OpenMP pool


def sparse_gemv_rows(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes,
                     scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                     group_size: int = 0) -> torch.Tensor:
    """y[:, group g] = (x * 1[|x| > thresholds[g]]) @ weight_t[:, group g], reading only kept rows.
    x: [T, K]; thresholds: [G] or [G, K] float32. weight_t: [K, N] contiguous in x's dtype, or quantized as
    teal::sparse_gemv takes it (scales, zeros, group_size; only where quantized_kernel() is built). Returns [T, N] in
    x's dtype. Inputs are compared in float32, as the kernels and the reference compare them."""
    if scales is not None:  # quantized: summed in float32
        y = quantized_kernel()(x.float().contiguous(), weight_t, scales, zeros, group_size, thresholds, split_sizes)
        return y.to(x.dtype)
    kernel = fused_kernel() if x.dtype == torch.float32 else None
    if kernel is not None:
        return kernel(x.contiguous(), weight_t, thresholds, split_sizes)
    return sparse_gemv_bags(x, weight_t, thresholds, split_sizes)


@functools.cache
def fused_kernel():
    """torch.ops.teal_cpu.sparse_gemv_rows, compiled on first use (a note while it builds), or None, with one warning
    line, where it cannot be built. The build folder is named by a hash of the source, torch and Python, so a changed
    source or a new torch builds afresh and never loads a stale library."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return cannot_build(f"no C++ compiler: {compiler} is not on PATH")
    source = KERNEL_SOURCE.read_bytes()
    # -march=native: a home folder shared by machines of other CPUs must not load another CPU's build
    key = hashlib.sha256(source + f"{torch.__version__} {sys.version} {KERNEL_FLAGS} {cpu_features()}".encode())
    key = key.hexdigest()[:16]
    name = f"teal_cpu_{key}"
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    start = time.perf_counter()
    fresh = not (build / f"{name}.so").exists()
    if fresh:
        print("building the CPU sparse kernel (once, ~5 s) ...", file=sys.stderr, flush=True)
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name, [str(KERNEL_SOURCE)], extra_cflags=KERNEL_FLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), is_python_module=False)
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        return cannot_build(f"{type(e).__name__}: " + next((line for line in lines if "error:" in line), lines[-1]))
    if fresh:
        print(f"built the CPU sparse kernel in {time.perf_counter() - start:.0f} s ({build})", file=sys.stderr,
              flush=True)
    return torch.ops.teal_cpu.sparse_gemv_rows.default


def quantized_kernel():
    """torch.ops.teal_cpu.quantized_sparse_gemv_rows, from fused_kernel's build, or None where it cannot be built."""
    return None if fused_kernel() is None else torch.ops.teal_cpu.quantized_sparse_gemv_rows.default


def cpu_features() -> str:
    """The CPU's model and instruction-set flags, as Linux reports them ('' elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = info.splitlines()
    return " ".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def cannot_build(reason: str) -> None:
    print(f"warning: the CPU sparse kernel could not be built ({reason[:200]}); CPU sparse decoding falls back to "
          "torch.embedding_bag, and quantized weights to dequantizing every row, which is slower", file=sys.stderr,
          flush=True)


def sparse_gemv_bags(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes) -> torch.Tensor:
    """sparse_gemv_rows through torch.embedding_bag: for dtypes other than float32, and where the fused kernel cannot
    be built."""
    unit, index, offsets, per_sample_weights = kept_row_bags(x, thresholds, split_sizes)
    rows = weight_t if unit == weight_t.shape[1] else weight_t.view(-1, unit)
    y = torch.embedding_bag(rows, index, offsets, False, 0, False, per_sample_weights)[0]
    return y if y.shape[0] == x.shape[0] else y.view(x.shape[0], -1)


def kept_row_bags(x: torch.Tensor, thresholds: torch.Tensor, split_sizes) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """The bags sparse_gemv_bags sums, one per token and column unit: (unit, the kept rows' indices into weight_t viewed
    as rows of `unit` columns, where each bag starts in them, the kept inputs as per-sample weights)."""
    tokens, k = x.shape
    unit, group_of_unit, first_bags = units_of(tuple(split_sizes), torch.get_num_threads(), x.device)
    units = group_of_unit.numel()
    # [units, K] or [units, 1]: each column unit's thresholds (a view when every group is one unit)
    unit_thresholds = thresholds.view(len(split_sizes), -1)
    if units > len(split_sizes):
        unit_thresholds = unit_thresholds.index_select(0, group_of_unit)
    if tokens == 1 and units == 1:  # o and down in a decode step: one bag, starting at 0
        values = x.view(k)
        row = (values.abs().float() > unit_thresholds.view(-1)).nonzero().view(-1)
        return unit, row, first_bags, values.index_select(0, row)
    if tokens == 1:
        values = x.view(k)
        bag, row = torch.where(values.abs().float() > unit_thresholds)  # by unit, rows ascending within each
        return unit, torch.add(bag, row, alpha=units), torch.searchsorted(bag, first_bags), values.index_select(0, row)
    kept = x.abs().float()[:, None, :] > unit_thresholds  # [T, units, K]
    token, bag_unit, row = kept.nonzero().unbind(1)  # bag (token, unit) by bag, rows ascending within each
    lengths = kept.sum(2).view(-1)
    return (unit, row * units + bag_unit, torch.cumsum(lengths, 0) - lengths,
            x.view(-1).index_select(0, token * k + row))


def grouped_sparse_gemv_cpu(x: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                            group_size: int, thresholds: torch.Tensor, split_sizes) -> torch.Tensor:
    """sparse_gemv_reference's product for group-wise quantized weights (grouped.py's layout), where the fused kernel
    cannot be built: each group of columns times its masked x, dequantized a slab at a time (quant.grouped_matmul).
    x: [T, K]; returns [T, N] in x's dtype."""
    per_byte = 2 if weight_t.dtype == torch.uint8 else 1
    out, col = [], 0
    for g, n in enumerate(split_sizes):
        kept = torch.where(x.abs().float() > thresholds[g], x, torch.zeros((), dtype=x.dtype))
        out.append(grouped_matmul(kept, weight_t[:, col // per_byte:(col + n) // per_byte], scales[:, col:col + n],
                                  None if zeros is None else zeros[:, col:col + n], group_size))
        col += n
    return torch.cat(out, dim=-1)


@functools.lru_cache
def units_of(split_sizes: tuple[int, ...], threads: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The column unit (the groups' common divisor, halved until there are as many units as threads: embedding_bag
    spreads its bags over the threads, and o or down would otherwise be one bag on one thread), each unit's group,
    and the units' indices (0, 1, ...: where a one-token step's bags start is the first kept entry of each)."""
    unit = math.gcd(*split_sizes)
    while sum(split_sizes) // unit < threads and unit % 2 == 0:
        unit //= 2
    group_of_unit = torch.repeat_interleave(torch.arange(len(split_sizes), device=device),
                                            torch.tensor(split_sizes, device=device) // unit)
    return unit, group_of_unit, torch.arange(group_of_unit.numel(), device=device)
