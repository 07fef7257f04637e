"""A decode step's attention in one kernel: the Triton kernel behind the `teal::decode_attention` op (attention.py).

It takes the token's q, k and v as the qkv projection wrote them (or as the fp32 partial sums a sparse projection
leaves, which it adds as it loads them), applies RoPE to q and k, writes k and v into the static KV cache at the
token's position, and attends over the positions written so far. Done by the compiler
instead, the rotations and the cache writes are three small kernels per layer ahead of the attention, each a
dependent launch in the step's chain.

Why not torch.compile's attention: inductor lowers a decode step's scaled_dot_product_attention into several
small kernels over the whole max_seq_length cache, and how fast those are depends on its coordinate-descent
tuning run. This kernel
reads only the positions written so far, once per KV head for all the query heads that share it (grouped-query
attention), with an online softmax.

Grid: (batch x KV heads, splits). Long caches are cut into splits of at least CHUNK positions (flash-decoding);
each writes a partial output and its log-sum-exp, and a second small kernel combines them. A cache that fits
one chunk needs one launch. On Hopper the kernels take part in programmatic dependent launch like the GEMVs.
"""
import torch
import triton
import triton.language as tl

from sparse_gemv.attention_tiles import attend, load_qkv, rope
from sparse_gemv.kernels import fp32_products, pdl_launch

CHUNK = 256  # positions per split; a cache of up to this many positions is one launch
MAX_SPLITS = 64


@triton.jit
def _decode_attention_kernel(qkv_ptr, freqs_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_o_ptr, part_lse_ptr,
                             HKV, sm_scale, stride_qkv, stride_part, stride_kb, stride_kh, stride_ks, stride_ob,
                             stride_oh, PARTS: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_LEN: tl.constexpr,
                             SPLITS: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < REP
    heads = kvh * REP + offs_h  # the query heads that read this KV head
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_p = tl.arange(0, BLOCK_D // 2)  # RoPE pairs
    p_mask = offs_p < D // 2
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_kb + kvh * stride_kh
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # qkv, the position and its RoPE row are earlier kernels' outputs
    cos = tl.load(freqs_ptr + 2 * offs_p, mask=p_mask, other=0.0)
    sin = tl.load(freqs_ptr + 2 * offs_p + 1, mask=p_mask, other=0.0)
    pos = tl.load(pos_ptr)
    length = pos + 1  # causal: the token at position p sees positions 0..p
    dtype = o_ptr.dtype.element_ty
    row = qkv_ptr + b * stride_qkv  # [q heads | k heads | v heads] x D
    q = rope(row + heads[:, None] * D + 2 * offs_p[None, :], h_mask[:, None] & p_mask[None, :], cos[None, :],
              sin[None, :], stride_part, PARTS, dtype, "").reshape(BLOCK_H, BLOCK_D)
    if split == pos // SPLIT_LEN:
        # The one program whose positions include the new token writes its k and v into the cache, then reads
        # them back with the rest (the barrier makes the row visible to all of this program's threads).
        k_new = rope(row + (HKV * REP + kvh) * D + 2 * offs_p, p_mask, cos, sin, stride_part, PARTS,
                     dtype, "").reshape(BLOCK_D)
        tl.store(k_base + pos * stride_ks + offs_d, k_new, mask=d_mask)
        v_new = load_qkv(row + (HKV * REP + HKV + kvh) * D + offs_d, d_mask, stride_part, PARTS, dtype, "").to(dtype)
        tl.store(v_base + pos * stride_ks + offs_d, v_new, mask=d_mask)
        tl.debug_barrier()
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    m, l, acc = attend(q, k_base, v_base, start, end, stride_ks, offs_d, d_mask, sm_scale, BLOCK_H, BLOCK_D, BLOCK_S,
                       DOT_FP32)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out_mask = h_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials [B * H, SPLITS, D] and log-sum-exp [B * H, SPLITS]; a split past the end writes lse = -inf.
        row = (b * HKV * REP + heads) * SPLITS + split
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], out, mask=out_mask)
        tl.store(part_lse_ptr + row, tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf")), mask=h_mask)


@triton.jit
def _attention_combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, H, stride_ob, stride_oh,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    lse = tl.load(part_lse_ptr + pid * SPLITS + offs_s)
    weight = tl.exp(lse - tl.max(lse, axis=0))  # split 0 always holds position 0, so the max is finite
    weight = weight / tl.sum(weight, axis=0)
    part = tl.load(part_o_ptr + (pid * SPLITS + offs_s)[:, None] * D + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], axis=0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


def decode_attention_triton(qkv, freqs_cis, k_cache, v_cache, input_pos, chunk: int = CHUNK,
                            block_s: int = 64) -> torch.Tensor:
    """Launch the kernel(s). qkv: [B, 1, (H + 2 H_kv) D] in the caches' dtype, or fp32 partial sums [P, B, 1, ...] of
    it, with the last dim contiguous; freqs_cis: [1, D / 2, 2]; k_cache, v_cache: [B', H_kv, S, D] (B' >= B) with
    the last dim contiguous. Returns [B, 1, H D] in the caches' dtype."""
    parts = qkv.shape[0] if qkv.dim() == 4 else 0
    row = qkv[0] if parts else qkv
    hkv, s, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    b, h = row.shape[0], row.shape[2] // d - 2 * hkv
    if row.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() or not freqs_cis.is_contiguous():
        raise ValueError("decode_attention: qkv and the caches need a contiguous last dimension, the caches equal "
                         "strides, freqs_cis contiguous")
    rep = h // hkv
    splits = min(triton.next_power_of_2(triton.cdiv(s, chunk)), MAX_SPLITS)
    split_len = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    out = torch.empty((b, 1, h * d), dtype=k_cache.dtype, device=qkv.device)
    use_pdl = pdl_launch(qkv.device)
    if splits > 1:
        part_o = torch.empty((b * h, splits, d), dtype=torch.float32, device=qkv.device)
        part_lse = torch.empty((b * h, splits), dtype=torch.float32, device=qkv.device)
    else:
        part_o = part_lse = out  # unused
    block_d = triton.next_power_of_2(d)
    _decode_attention_kernel[(b * hkv, splits)](
        qkv, freqs_cis, k_cache, v_cache, input_pos, out, part_o, part_lse, hkv, d ** -0.5,
        row.stride(0), qkv.stride(0) if parts else 0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), d, PARTS=parts, REP=rep, BLOCK_H=max(16, triton.next_power_of_2(rep)), D=d, BLOCK_D=block_d,
        BLOCK_S=block_s, SPLIT_LEN=split_len, SPLITS=splits, DOT_FP32=fp32_products(k_cache.dtype), USE_PDL=use_pdl,
        num_warps=4, launch_pdl=use_pdl)
    if splits > 1:
        _attention_combine_kernel[(b * h,)](part_o, part_lse, out, h, out.stride(0), d, D=d, BLOCK_D=block_d,
                                         SPLITS=splits, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out
