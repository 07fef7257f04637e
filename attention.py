"""Single-token attention over the static KV cache: a Triton kernel behind the `teal::decode_attention` op.

Why not torch.compile's attention: inductor lowers a decode step's scaled_dot_product_attention into several
small kernels over the whole max_seq_length cache, and how fast those are depends on its coordinate-descent
tuning run (0.28 to 0.69 ms of a Llama-3-8B step on the same H100, benchmark/results/decode-*.json). This kernel
reads only the positions written so far, once per KV head for all the query heads that share it (grouped-query
attention), with an online softmax.

Grid: (batch x KV heads, splits). Long caches are cut into splits of at least CHUNK positions (flash-decoding);
each writes a partial output and its log-sum-exp, and a second small kernel combines them. A cache that fits
one chunk needs one launch. On Hopper the kernels take part in programmatic dependent launch like the GEMVs.
"""
import torch
import triton
import triton.language as tl

from sparse_gemv.kernels import fp32_products, pdl_launch

CHUNK = 256  # positions per split; a cache of up to this many positions is one launch
MAX_SPLITS = 64


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_o_ptr, part_lse_ptr,
                             HKV, sm_scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                             stride_ob, stride_oh,
                             REP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_S: tl.constexpr, SPLIT_LEN: tl.constexpr, SPLITS: tl.constexpr,
                             DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < REP
    heads = kvh * REP + offs_h  # the query heads that read this KV head
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # q and the cache row just written come from the previous kernel
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    length = tl.load(pos_ptr) + 1  # causal: the token at position p sees positions 0..p
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_kb + kvh * stride_kh
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < end
        kv_off = offs_s[:, None] * stride_ks + offs_d[None, :]
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        # Query heads padded to BLOCK_H >= 16 rows make both products tensor-core shaped.
        if DOT_FP32:
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(s_mask[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every block holds at least one position
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
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


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must be [B, H, 1, D] (one token), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must be one [B, H_kv, S, D] shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, h, _, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or h % k_cache.shape[1]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)} "
                         "(same batch and head size, query heads a multiple of KV heads)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"decode_attention: q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if input_pos.numel() != 1 or input_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: input_pos must hold one integer position, got {tuple(input_pos.shape)} {input_pos.dtype}")
    if not (q.device == k_cache.device == v_cache.device == input_pos.device):
        raise ValueError("decode_attention: q, the caches and input_pos must be on one device")


def decode_attention_reference(q, k_cache, v_cache, input_pos):
    """Causal attention of one query token over the cache, as the model's multi-token path computes it."""
    rep = q.shape[1] // k_cache.shape[1]
    k = k_cache.repeat_interleave(rep, dim=1)
    v = v_cache.repeat_interleave(rep, dim=1)
    mask = torch.arange(k_cache.shape[2], device=q.device) <= input_pos.reshape(())
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None, None, :])


def decode_attention_triton(q, k_cache, v_cache, input_pos, chunk: int = CHUNK, block_s: int = 64) -> torch.Tensor:
    """Launch the kernel(s). q: [B, H, 1, D]; k_cache, v_cache: [B, H_kv, S, D] with the last dim contiguous."""
    b, h, _, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if q.stride(3) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention: q and the caches need a contiguous last dimension and equal cache strides")
    rep = h // hkv
    splits = min(triton.next_power_of_2(triton.cdiv(s, chunk)), MAX_SPLITS)
    split_len = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    out = torch.empty((b, h, 1, d), dtype=q.dtype, device=q.device)
    use_pdl = pdl_launch(q.device)
    if splits > 1:
        part_o = torch.empty((b * h, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b * h, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    block_d = triton.next_power_of_2(d)
    _decode_attention_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, input_pos, out, part_o, part_lse, hkv, d ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        REP=rep, BLOCK_H=max(16, triton.next_power_of_2(rep)), D=d, BLOCK_D=block_d, BLOCK_S=block_s,
        SPLIT_LEN=split_len, SPLITS=splits, DOT_FP32=fp32_products(q.dtype), USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    if splits > 1:
        _attention_combine_kernel[(b * h,)](part_o, part_lse, out, h, out.stride(0), out.stride(1), D=d, BLOCK_D=block_d,
                                         SPLITS=splits, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out


@torch.library.custom_op("teal::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over cache positions 0..input_pos, for one query token: [B, H, 1, D]."""
    check_inputs(q, k_cache, v_cache, input_pos)
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, input_pos)
    return decode_attention_reference(q, k_cache, v_cache, input_pos)


@decode_attention.register_fake
def _(q, k_cache, v_cache, input_pos):
    return q.new_empty(q.shape)
