"""The sparse GEMV on CPU: only the kept weight rows are read, as the Triton kernel reads them on a GPU.

y = sum over kept inputs k of x[k] * weight_t[k, :] is an embedding bag: rows of weight_t looked up by index, scaled by
per-sample weights and summed. PyTorch's CPU embedding_bag (FBGEMM) streams just those rows, so at 50% sparsity a step
reads half the bytes, where masking and multiplying densely reads them all. Each group of columns (q/k/v, gate/up)
has its own kept rows: weight_t [K, N] is viewed as [K * N / unit, unit] rows of `unit` columns (the groups' common
divisor), and every unit of a group's columns is one bag over that group's kept rows. No Triton here.

A decode step on CPU is bound by the fixed cost of each operation as much as by bytes (a small model's step is
thousands of them), so the one-token path is a handful of operations: one mask for all units, one nonzero, and the
bag index, bag starts and per-sample weights each in one operation.

Group-wise quantized weights (grouped.py's layout) take grouped_sparse_gemv_cpu instead: the masked product, the
weight dequantized a slab of columns at a time (quant.grouped_matmul), every row read.
"""
import functools
import math

import torch

from sparse_gemv.quant import grouped_matmul


def sparse_gemv_rows(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes) -> torch.Tensor:
    """y[:, group g] = (x * 1[|x| > thresholds[g]]) @ weight_t[:, group g], reading only kept rows.
    x: [T, K]; weight_t: [K, N] contiguous, x's dtype; thresholds: [G] or [G, K] float32. Returns [T, N] in x's dtype.
    Inputs are compared in float32, as the kernels and the reference compare them."""
    unit, index, offsets, per_sample_weights = kept_row_bags(x, thresholds, split_sizes)
    rows = weight_t if unit == weight_t.shape[1] else weight_t.view(-1, unit)
    y = torch.embedding_bag(rows, index, offsets, False, 0, False, per_sample_weights)[0]
    return y if y.shape[0] == x.shape[0] else y.view(x.shape[0], -1)


def kept_row_bags(x: torch.Tensor, thresholds: torch.Tensor, split_sizes) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """The bags sparse_gemv_rows sums, one per token and column unit: (unit, the kept rows' indices into weight_t viewed
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
    """sparse_gemv_reference's product for group-wise quantized weights (grouped.py's layout): each group of columns
    times its masked x, dequantized a slab at a time (quant.grouped_matmul). x: [T, K]; returns [T, N] in x's dtype."""
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
