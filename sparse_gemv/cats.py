"""CATS's MLP input stage (Lee et al., 2024): the Triton kernel behind the `teal::cats_gate_up` custom op (ops.py).

    a = SiLU(x W_gate^T),  h = (a * 1[|a| > t]) * (x W_up^T)

The gate is computed densely; only the up rows whose |a| is over the layer's threshold t are read (W_up is stored
by output channel, so a kept channel is one contiguous row), and h is zero elsewhere. The down projection then
skips the rows of its weight whose h is zero (teal::sparse_gemv with threshold 0, sparse.CatsFeedForward).

One launch per step: each program owns BLOCK_J intermediate channels, computes their gate over all of x, then loads
only the kept channels' up rows (masked loads issue no memory traffic). With several tokens a row is read when any
token keeps it, and each token's h keeps its own mask.
"""
import torch
import triton
import triton.language as tl

from sparse_gemv.kernels import INTERPRET, fp32_products, pdl_launch


@triton.jit
def _rows_times_x(rows, row_mask, x_ptr, offs_t, t_mask, stride_xt, D,
                  BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr, STAGES: tl.constexpr):
    """BLOCK_J rows of a [., D] weight (rows: their pointers) times the tokens' x, fp32: [BLOCK_J] for one token,
    [BLOCK_J, BLOCK_T] for several. Rows outside row_mask are not read (their loads are masked) and give 0."""
    if BLOCK_T == 1:
        # One token: products accumulated elementwise, reduced over D once at the end.
        acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = tl.load(x_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            w = tl.load(rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
    else:
        # Several tokens: [BLOCK_J, BLOCK_T] products on tensor cores, the tokens padded to BLOCK_T columns.
        out = tl.zeros((BLOCK_J, BLOCK_T), dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xt = tl.load(x_ptr + offs_t[None, :] * stride_xt + offs_d[:, None],
                         mask=d_mask[:, None] & t_mask[None, :], other=0.0)
            w = tl.load(rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT_FP32:
                out = tl.dot(w.to(tl.float32), xt.to(tl.float32), out, input_precision="ieee")
            else:
                out = tl.dot(w, xt, out)
    return out


@triton.jit
def _cats_gate_up_kernel(x_ptr, w_ptr, thr_ptr, h_ptr, T, D, I, stride_xt, stride_ht,
                         BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_FP32: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < I
    gate_rows = w_ptr + offs_j[:, None] * D  # W_gate is rows 0..I-1 of the fused [2I, D] weight, W_up rows I..2I-1
    up_rows = w_ptr + (I + offs_j[:, None]) * D
    thr = tl.load(thr_ptr)  # thresholds are no kernel's output: read while the previous kernel drains
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    gate = _rows_times_x(gate_rows, j_mask, x_ptr, offs_t, t_mask, stride_xt, D, BLOCK_T, BLOCK_J, BLOCK_D, DOT_FP32,
                         STAGES)
    a = gate * tl.sigmoid(gate)
    if BLOCK_T == 1:
        keep = (tl.abs(a) > thr) & j_mask
    else:
        keep_t = (tl.abs(a) > thr) & j_mask[:, None] & t_mask[None, :]
        keep = tl.max(keep_t.to(tl.int32), axis=1) > 0  # a row is read when any token keeps it
    up = _rows_times_x(up_rows, keep, x_ptr, offs_t, t_mask, stride_xt, D, BLOCK_T, BLOCK_J, BLOCK_D, DOT_FP32,
                       STAGES)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # weights are all read
    if BLOCK_T == 1:
        h = tl.where(keep, a * up, 0.0)
        tl.store(h_ptr + offs_j, h.to(h_ptr.dtype.element_ty), mask=j_mask)
    else:
        h = tl.where(keep_t, a * up, 0.0)
        tl.store(h_ptr + offs_t[None, :] * stride_ht + offs_j[:, None], h.to(h_ptr.dtype.element_ty),
                 mask=j_mask[:, None] & t_mask[None, :])


def cats_config(t: int) -> dict:
    """Tiles by rule, not tuned: 16 channels a program (Llama-3-8B: 896 programs, several per SM, so the masked up
    loads of one program overlap others' gate loads) and 256-wide strips of D (512 contiguous bytes of a bf16 row)."""
    if INTERPRET:
        return {"BLOCK_J": 16, "BLOCK_D": 32, "STAGES": 1, "num_warps": 4}
    return {"BLOCK_J": 16 if t == 1 else 32, "BLOCK_D": 256 if t == 1 else 64, "STAGES": 3, "num_warps": 4}


def cats_gate_up_triton(x: torch.Tensor, w13: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: x [T<=8, D], w13 [2I, D] (gate rows then up rows), threshold fp32 [1] -> h [T, I]."""
    t, d = x.shape
    i = w13.shape[0] // 2
    h = torch.empty((t, i), dtype=x.dtype, device=x.device)
    meta = cats_config(t)
    warps = meta.pop("num_warps")
    use_pdl = pdl_launch(x.device)
    grid = (triton.cdiv(i, meta["BLOCK_J"]),)
    _cats_gate_up_kernel[grid](x, w13, threshold, h, t, d, i, x.stride(0), h.stride(0),
                               BLOCK_T=1 if t == 1 else 16, DOT_FP32=fp32_products(x.dtype), USE_PDL=use_pdl,
                               **meta, num_warps=warps, num_stages=1, launch_pdl=use_pdl)
    return h
