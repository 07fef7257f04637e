"""The sparse GEMV on CPU: only the kept weight rows are read, as the Triton kernel reads them on a GPU.

y = sum over kept inputs k of x[k] * weight_t[k, :] is an embedding bag: rows of weight_t looked up by index, scaled by
per-sample weights and summed. PyTorch's CPU embedding_bag (FBGEMM) streams just those rows, so at 50% sparsity a step
reads half the bytes, where masking and multiplying densely reads them all. Each group of columns (q/k/v, gate/up)
has its own kept rows: weight_t [K, N] is viewed as [K * N / unit, unit] rows of `unit` columns (the groups' common
divisor), and every unit of a group's columns is one bag over that group's kept rows. No Triton here.
"""
import functools
import math

import torch
import torch.nn.functional as F


def sparse_gemv_rows(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes) -> torch.Tensor:
    """y[:, group g] = (x * 1[|x| > thresholds[g]]) @ weight_t[:, group g], reading only kept rows.
    x: [T, K]; weight_t: [K, N] contiguous, x's dtype; thresholds: [G] or [G, K] float32. Returns [T, N] in x's dtype.
    Inputs are compared in float32, as the kernels and the reference compare them."""
    tokens, k = x.shape
    if tokens == 1 and len(split_sizes) == 1:  # o and down in a decode step: the same, in fewer operations
        row = (x.view(-1).abs().float() > thresholds.view(-1)).nonzero().view(-1)
        return F.embedding_bag(row, weight_t, row.new_zeros(1), mode="sum",
                               per_sample_weights=x.view(-1).index_select(0, row))
    unit, group_of_unit = units_of(tuple(split_sizes), x.device)
    units = group_of_unit.numel()
    unit_thresholds = thresholds.view(len(split_sizes), -1).index_select(0, group_of_unit)
    kept = x.abs().float()[:, None, :] > unit_thresholds  # [T, units, K]
    token, bag_unit, row = kept.nonzero().unbind(1)  # bag (token, unit) by bag, rows ascending within each
    lengths = kept.sum(2).view(-1)
    y = F.embedding_bag(row * units + bag_unit, weight_t.view(k * units, unit), torch.cumsum(lengths, 0) - lengths,
                        mode="sum", per_sample_weights=x.view(-1).index_select(0, token * k + row))
    return y.view(tokens, units * unit)


@functools.lru_cache
def units_of(split_sizes: tuple[int, ...], device: torch.device) -> tuple[int, torch.Tensor]:
    """The column unit (the groups' common divisor) and each unit's group."""
    unit = math.gcd(*split_sizes)
    return unit, torch.repeat_interleave(torch.arange(len(split_sizes), device=device),
                                         torch.tensor(split_sizes, device=device) // unit)
