"""The `teal::sparse_gemv` custom op: checked inputs, a Triton path on CUDA, a PyTorch path elsewhere.

Registered through torch.library with a fake (meta) implementation, so torch.compile(fullgraph=True)
traces it as one opaque node and CUDA graphs capture its launch. Thresholds are an input tensor:
a new sparsity is a copy into that tensor, never a recompilation.
"""
from typing import Optional

import torch

from sparse_gemv.cpu import sparse_gemv_rows
from sparse_gemv.kernels import MAX_TOKENS, default_config, sparse_gemv_triton

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes,
                 scales: torch.Tensor | None = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"sparse_gemv: x must be [tokens, K], got shape {tuple(x.shape)}")
    if weight_t.dim() != 2 or weight_t.shape[0] != x.shape[1]:
        raise ValueError(f"sparse_gemv: weight_t must be [K, N] with K={x.shape[1]} (input channels as rows), "
                         f"got {tuple(weight_t.shape)}; store W.t().contiguous()")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sparse_gemv: x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if scales is None and weight_t.dtype != x.dtype:
        raise TypeError(f"sparse_gemv: weight_t must have x's dtype {x.dtype} (or be int8 with scales), got {weight_t.dtype}")
    if scales is not None and (weight_t.dtype != torch.int8 or scales.dtype != torch.float32
                               or tuple(scales.shape) != (weight_t.shape[1],) or scales.device != x.device):
        raise TypeError(f"sparse_gemv: scales go with int8 weights: a float32 [{weight_t.shape[1]}] tensor on {x.device} "
                        f"(one per output column), got {weight_t.dtype} weights and {scales.dtype} "
                        f"{tuple(scales.shape)} scales on {scales.device}")
    if not weight_t.is_contiguous():
        raise ValueError("sparse_gemv: weight_t must be contiguous [K, N]; convert once at load with W.t().contiguous()")
    if thresholds.dtype != torch.float32:
        raise TypeError(f"sparse_gemv: thresholds must be float32, got {thresholds.dtype}")
    if not (x.device == weight_t.device == thresholds.device):
        raise ValueError(f"sparse_gemv: x, weight_t and thresholds must be on one device, got "
                         f"{x.device}, {weight_t.device}, {thresholds.device}")
    if not 1 <= len(split_sizes) <= 3 or sum(split_sizes) != weight_t.shape[1] or min(split_sizes) <= 0:
        raise ValueError(f"sparse_gemv: split_sizes {list(split_sizes)} must be 1-3 positive sizes summing to N={weight_t.shape[1]}")
    g = len(split_sizes)
    if tuple(thresholds.shape) not in ((g,), (g, x.shape[1])):
        raise ValueError(f"sparse_gemv: thresholds must be [{g}] (per tensor) or [{g}, {x.shape[1]}] (per channel), "
                         f"got {tuple(thresholds.shape)}")


def sparse_gemv_reference(x, weight_t, thresholds, split_sizes, scales=None):
    """Mask, multiply densely (and scale the columns of int8 weights): the definition the kernels are tested against."""
    outs, col = [], 0
    for g, n in enumerate(split_sizes):
        # compared in float32, as the kernels compare: a threshold rounded to bf16 would mask other entries
        xm = torch.where(x.abs().float() > thresholds[g].float(), x, torch.zeros((), dtype=x.dtype, device=x.device))
        outs.append(xm @ weight_t[:, col:col + n].to(x.dtype))
        col += n
    y = torch.cat(outs, dim=-1)
    return y if scales is None else y * scales.to(y.dtype)


@torch.library.custom_op("teal::sparse_gemv", mutates_args=())
def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes: list[int],
                compact: bool = False, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[:, group g] = (x * 1[|x| > thresholds[g]]) @ weight_t[:, group g], for x: [T, K], weight_t: [K, N].
    compact picks the kernel variant that lists kept rows first (faster above about 70% sparsity).
    scales: fp32 [N] for int8 weight_t (weight-only quantization): y is scaled per output column."""
    x = x.contiguous()
    if _on_kernel(x):  # the launcher checks its inputs
        return sparse_gemv_triton(x, weight_t, thresholds, split_sizes, compact=compact, scales=scales)
    check_inputs(x, weight_t, thresholds, split_sizes, scales)
    if _skips_rows_on_cpu(x, scales):
        return sparse_gemv_rows(x, weight_t, thresholds, split_sizes)
    return sparse_gemv_reference(x, weight_t, thresholds, split_sizes, scales)


@sparse_gemv.register_fake
def _(x, weight_t, thresholds, split_sizes, compact=False, scales=None):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


def add_partials(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sparse_gemv_partials' output [P, ...] added in order and rounded to dtype once, as the kernels add them.
    Unrolled adds, so that inductor fuses them into the kernel that reads the sum for any number of partials (it makes
    parts.sum(0) over 8 or more a reduction kernel of its own). teal::decode_attention's reference rounds them to the
    caches' dtype; sparse.py leaves them in fp32 for the norm to add."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total.to(dtype)


@torch.library.custom_op("teal::sparse_gemv_partials", mutates_args=())
def sparse_gemv_partials(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes: list[int],
                         compact: bool = False, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same product as sparse_gemv, left as fp32 partial sums over slices of K: [S, T, N], summing to y in fp32.
    The kernel's own reduction of a K split is a serial tail (store, atomic counter, reload); returned as partials,
    the sums are added where they are read (under torch.compile, inside the RMSNorm that follows o or down, or by the
    attention op that reads q, k and v)."""
    x = x.contiguous()
    if _on_kernel(x):  # the launcher checks its inputs
        return sparse_gemv_triton(x, weight_t, thresholds, split_sizes, compact=compact, reduce=False, scales=scales)
    check_inputs(x, weight_t, thresholds, split_sizes, scales)
    if _skips_rows_on_cpu(x, scales) and x.dtype == torch.float32:
        return sparse_gemv_rows(x, weight_t, thresholds, split_sizes)[None]
    return sparse_gemv_reference(x.float(), weight_t.float(), thresholds, split_sizes, scales=scales)[None]


@sparse_gemv_partials.register_fake
def _(x, weight_t, thresholds, split_sizes, compact=False, scales=None):
    if _on_kernel(x):  # as many partials as the launch's K split
        int8 = weight_t.dtype == torch.int8
        splits = default_config(x.device, x.shape[1], split_sizes, compact, reduce=False, int8=int8)["SPLIT_K"]
    else:
        splits = 1
    return x.new_empty((splits, x.shape[0], weight_t.shape[1]), dtype=torch.float32)


def _skips_rows_on_cpu(x: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether the CPU path reads only the kept rows (decode-sized steps of float weights) rather than masking and
    multiplying densely (many tokens, where the product is bound by compute, not bytes; int8 weights)."""
    return x.device.type == "cpu" and x.shape[0] <= MAX_TOKENS and scales is None


def _on_kernel(x: torch.Tensor) -> bool:
    """Whether the Triton kernel runs (CUDA, up to MAX_TOKENS tokens) rather than the PyTorch reference."""
    return x.is_cuda and x.shape[0] <= MAX_TOKENS
