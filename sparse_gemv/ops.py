"""The `teal::sparse_gemv`, `teal::sparse_gemv_partials` and `teal::cats_gate_up` custom ops: checked inputs, a Triton
path on CUDA, a PyTorch path elsewhere.

Registered through torch.library with a fake (meta) implementation, so torch.compile(fullgraph=True)
traces it as one opaque node and CUDA graphs capture its launch. Thresholds are an input tensor:
a new sparsity is a copy into that tensor, never a recompilation.

The Triton modules (kernels.py, grouped.py, cats.py) are imported in the branch that launches them (_on_kernel), so
the ops' CPU paths run where triton is not installed (a CPU build of torch does not bring it).
"""
from typing import Optional

import torch

from sparse_gemv.cpu import grouped_sparse_gemv_cpu, quantized_kernel, sparse_gemv_rows
from sparse_gemv.quant import GROUP_SIZES, dequantize_grouped

MAX_TOKENS = 8  # above this many tokens the weight rows an input skips become rare: use a dense matmul
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, group_size: int = 0) -> None:
    if x.dim() != 2:
        raise ValueError(f"sparse_gemv: x must be [tokens, K], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES and not (x.dtype == torch.float64 and x.device.type == "cpu"):
        raise TypeError(f"sparse_gemv: x must be one of {SUPPORTED_DTYPES} (or float64 on CPU), got {x.dtype}")
    if group_size:
        check_grouped(x, weight_t, scales, zeros, group_size, split_sizes)
    else:
        if zeros is not None:
            raise TypeError("sparse_gemv: zeros go with group-wise quantized weights (group_size > 0)")
        if weight_t.dim() != 2 or weight_t.shape[0] != x.shape[1]:
            raise ValueError(f"sparse_gemv: weight_t must be [K, N] with K={x.shape[1]} (input channels as rows), "
                             f"got {tuple(weight_t.shape)}; store W.t().contiguous()")
        if scales is None and weight_t.dtype != x.dtype:
            raise TypeError(f"sparse_gemv: weight_t must have x's dtype {x.dtype} (or be int8 with scales), got {weight_t.dtype}")
        if scales is not None and (weight_t.dtype != torch.int8 or scales.dtype != torch.float32
                                   or tuple(scales.shape) != (weight_t.shape[1],) or scales.device != x.device):
            raise TypeError(f"sparse_gemv: scales go with int8 weights: a float32 [{weight_t.shape[1]}] tensor on {x.device} "
                            f"(one per output column), got {weight_t.dtype} weights and {scales.dtype} "
                            f"{tuple(scales.shape)} scales on {scales.device}")
        if not weight_t.is_contiguous():
            raise ValueError("sparse_gemv: weight_t must be contiguous [K, N]; convert once at load with W.t().contiguous()")
    n = scales.shape[1] if group_size else weight_t.shape[1]
    if thresholds.dtype != torch.float32:
        raise TypeError(f"sparse_gemv: thresholds must be float32, got {thresholds.dtype}")
    if not (x.device == weight_t.device == thresholds.device):
        raise ValueError(f"sparse_gemv: x, weight_t and thresholds must be on one device, got "
                         f"{x.device}, {weight_t.device}, {thresholds.device}")
    if not 1 <= len(split_sizes) <= 3 or sum(split_sizes) != n or min(split_sizes) <= 0:
        raise ValueError(f"sparse_gemv: split_sizes {list(split_sizes)} must be 1-3 positive sizes summing to N={n}")
    g = len(split_sizes)
    if tuple(thresholds.shape) not in ((g,), (g, x.shape[1])):
        raise ValueError(f"sparse_gemv: thresholds must be [{g}] (per tensor) or [{g}, {x.shape[1]}] (per channel), "
                         f"got {tuple(thresholds.shape)}")


def check_grouped(x, weight_t, scales, zeros, group_size, split_sizes) -> None:
    """Group-wise quantized weights (sparse_gemv/grouped.py): 4-bit uint8 [K, N / 2] or 8-bit int8 [K, N], fp16 scales
    and zeros [ceil(K / group_size), N]; output groups in whole int32 words (8 columns at 4 bits, 4 at 8)."""
    k = x.shape[1]
    if group_size not in GROUP_SIZES:
        raise ValueError(f"sparse_gemv: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if scales is None or scales.dtype != torch.float16 or scales.dim() != 2:
        raise TypeError("sparse_gemv: group-wise quantized weights need fp16 scales [ceil(K / group_size), N]")
    n = scales.shape[1]
    per_byte = {torch.uint8: 2, torch.int8: 1}.get(weight_t.dtype)
    if per_byte is None or tuple(weight_t.shape) != (k, n // per_byte) or n % per_byte:
        raise TypeError(f"sparse_gemv: group-wise weights are uint8 [K, N / 2] (4 bits) or int8 [K, N] (8 bits) with "
                        f"K={k}, N={n}; got {weight_t.dtype} {tuple(weight_t.shape)}")
    if tuple(scales.shape) != (-(-k // group_size), n):
        raise ValueError(f"sparse_gemv: scales must be [{-(-k // group_size)}, {n}] for K={k} in groups of "
                         f"{group_size}, got {tuple(scales.shape)}")
    if zeros is not None and (zeros.dtype != torch.float16 or zeros.shape != scales.shape):
        raise TypeError(f"sparse_gemv: zeros must be fp16 like the scales {tuple(scales.shape)}, got {zeros.dtype} "
                        f"{tuple(zeros.shape)}")
    word = 4 * per_byte  # columns per int32 word
    if any(s % word for s in split_sizes):
        raise ValueError(f"sparse_gemv: {8 // per_byte}-bit weights need every output group a multiple of {word} "
                         f"columns (whole int32 words), got {list(split_sizes)}")
    tensors = (weight_t, scales) if zeros is None else (weight_t, scales, zeros)
    if any(t.device != x.device or not t.is_contiguous() for t in tensors) or weight_t.data_ptr() % 4:
        raise ValueError(f"sparse_gemv: quantized weights, scales and zeros must be contiguous on {x.device}, the "
                         "weights 4-byte aligned")


def sparse_gemv_reference(x, weight_t, thresholds, split_sizes, scales=None, zeros=None, group_size=0):
    """Mask, multiply densely (and scale the columns of int8 weights; dequantize group-wise quantized ones first):
    the definition the kernels are tested against."""
    if group_size:
        weight_t, scales = dequantize_grouped(weight_t, scales, zeros, group_size, x.dtype), None
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
                compact: bool = False, scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None,
                group_size: int = 0) -> torch.Tensor:
    """y[:, group g] = (x * 1[|x| > thresholds[g]]) @ weight_t[:, group g], for x: [T, K], weight_t: [K, N].
    compact picks the kernel variant that lists kept rows first (faster above about 70% sparsity).
    scales: fp32 [N] for int8 weight_t (weight-only quantization): y is scaled per output column.
    group_size > 0: group-wise quantized weight_t (4-bit uint8 [K, N / 2] or 8-bit int8 [K, N]) with fp16 scales and
    optional zeros [ceil(K / group_size), N] (sparse_gemv/grouped.py). On CPU up to MAX_TOKENS tokens take the fused
    kernel (cpu.sparse_gemv_rows), which reads only the kept rows of any of these weights."""
    x = x.contiguous()
    if _on_kernel(x) and group_size:  # the launchers check their inputs
        from sparse_gemv.grouped import grouped_sparse_gemv_triton
        return grouped_sparse_gemv_triton(x, weight_t, scales, zeros, group_size, thresholds, split_sizes, compact)
    if _on_kernel(x):
        from sparse_gemv.kernels import sparse_gemv_triton
        return sparse_gemv_triton(x, weight_t, thresholds, split_sizes, compact=compact, scales=scales)
    check_inputs(x, weight_t, thresholds, split_sizes, scales, zeros, group_size)
    if skips_rows_on_cpu(x, scales):
        return sparse_gemv_rows(x, weight_t, thresholds, split_sizes, scales, zeros, group_size)
    if group_size and x.shape[0] <= MAX_TOKENS:  # no fused kernel: scaled once a group, a slab of columns at a time
        return grouped_sparse_gemv_cpu(x, weight_t, scales, zeros, group_size, thresholds, split_sizes)
    return sparse_gemv_reference(x, weight_t, thresholds, split_sizes, scales, zeros, group_size)


@sparse_gemv.register_fake
def _(x, weight_t, thresholds, split_sizes, compact=False, scales=None, zeros=None, group_size=0):
    return x.new_empty((x.shape[0], scales.shape[1] if group_size else weight_t.shape[1]))


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
                         compact: bool = False, scales: Optional[torch.Tensor] = None,
                         zeros: Optional[torch.Tensor] = None, group_size: int = 0) -> torch.Tensor:
    """The same product as sparse_gemv, left as fp32 partial sums over slices of K: [S, T, N], summing to y in fp32.
    The kernel's own reduction of a K split is a serial tail (store, atomic counter, reload); returned as partials,
    the sums are added where they are read (under torch.compile, inside the RMSNorm that follows o or down, or by the
    attention op that reads q, k and v)."""
    x = x.contiguous()
    if _on_kernel(x) and group_size:  # the launchers check their inputs
        from sparse_gemv.grouped import grouped_sparse_gemv_triton
        return grouped_sparse_gemv_triton(x, weight_t, scales, zeros, group_size, thresholds, split_sizes, compact,
                                          reduce=False)
    if _on_kernel(x):
        from sparse_gemv.kernels import sparse_gemv_triton
        return sparse_gemv_triton(x, weight_t, thresholds, split_sizes, compact=compact, reduce=False, scales=scales)
    check_inputs(x, weight_t, thresholds, split_sizes, scales, zeros, group_size)
    if skips_rows_on_cpu(x, scales) and (x.dtype == torch.float32 or scales is not None):
        return sparse_gemv_rows(x.float(), weight_t, thresholds, split_sizes, scales, zeros, group_size)[None]
    if group_size and x.shape[0] <= MAX_TOKENS:
        return grouped_sparse_gemv_cpu(x.float(), weight_t, scales, zeros, group_size, thresholds, split_sizes)[None]
    if group_size:
        return sparse_gemv_reference(x.float(), weight_t, thresholds, split_sizes, scales, zeros, group_size)[None]
    return sparse_gemv_reference(x.float(), weight_t.float(), thresholds, split_sizes, scales=scales)[None]


@sparse_gemv_partials.register_fake
def _(x, weight_t, thresholds, split_sizes, compact=False, scales=None, zeros=None, group_size=0):
    if _on_kernel(x) and group_size:  # as many partials as the launch's K split
        from sparse_gemv.grouped import grouped_config
        bits = 4 if weight_t.dtype == torch.uint8 else 8
        splits = grouped_config(x.device, x.shape[1], split_sizes, compact, group_size, x.shape[0], bits)["SPLIT_K"]
    elif _on_kernel(x):
        from sparse_gemv.kernels import default_config
        int8 = weight_t.dtype == torch.int8
        splits = default_config(x.device, x.shape[1], split_sizes, compact, reduce=False, int8=int8)["SPLIT_K"]
    else:
        splits = 1
    return x.new_empty((splits, x.shape[0], scales.shape[1] if group_size else weight_t.shape[1]),
                       dtype=torch.float32)


def cats_gate_up_reference(x: torch.Tensor, w13: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The formula in PyTorch, in fp32 as the kernel computes it, rounded to x's dtype once."""
    gate, up = (x.float() @ w13.float().t()).chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate)
    return torch.where(a.abs() > threshold.float(), a * up, torch.zeros((), device=x.device)).to(x.dtype)


def check_cats_inputs(x: torch.Tensor, w13: torch.Tensor, threshold: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 2 or w13.shape[1] != x.shape[1] or w13.shape[0] % 2:
        raise ValueError(f"cats_gate_up: x must be [tokens, D] and w13 [2 * I, D] (gate rows, then up rows), got "
                         f"{tuple(x.shape)} and {tuple(w13.shape)}")
    if w13.dtype != x.dtype or not w13.is_contiguous():
        raise TypeError(f"cats_gate_up: w13 must be contiguous in x's dtype {x.dtype}, got {w13.dtype}")
    if threshold.dtype != torch.float32 or threshold.numel() != 1:
        raise TypeError(f"cats_gate_up: threshold must be one float32, got {threshold.dtype} {tuple(threshold.shape)}")
    if not (x.device == w13.device == threshold.device):
        raise ValueError(f"cats_gate_up: x, w13 and threshold must be on one device, got {x.device}, {w13.device}, "
                         f"{threshold.device}")


@torch.library.custom_op("teal::cats_gate_up", mutates_args=())
def cats_gate_up(x: torch.Tensor, w13: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """h = (a * 1[|a| > threshold]) * (x W_up^T) with a = SiLU(x W_gate^T); x [T, D], w13 [2I, D] -> h [T, I].
    Triton on CUDA for up to MAX_TOKENS tokens, the PyTorch reference otherwise."""
    check_cats_inputs(x, w13, threshold)
    x = x.contiguous()
    if _on_kernel(x):
        from sparse_gemv.cats import cats_gate_up_triton
        return cats_gate_up_triton(x, w13, threshold)
    return cats_gate_up_reference(x, w13, threshold)


@cats_gate_up.register_fake
def _(x, w13, threshold):
    return x.new_empty((x.shape[0], w13.shape[0] // 2))


def skips_rows_on_cpu(x: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether the CPU path reads only the kept rows (decode-sized steps; of quantized weights where the fused kernel
    is built, for activations in a dtype the kernels take) rather than masking and multiplying densely (many tokens,
    where the product is bound by compute, not bytes)."""
    if x.device.type != "cpu" or x.shape[0] > MAX_TOKENS:
        return False
    return scales is None or (x.dtype in SUPPORTED_DTYPES and quantized_kernel() is not None)


def _on_kernel(x: torch.Tensor) -> bool:
    """Whether the Triton kernel runs (CUDA, up to MAX_TOKENS tokens) rather than the PyTorch reference."""
    return x.is_cuda and x.shape[0] <= MAX_TOKENS
