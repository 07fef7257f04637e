"""A decode step's attention in one kernel: the Triton kernel behind the `teal::decode_attention` op.

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
from sparse_gemv.ops import add_partials

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


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved (even, odd) pairs. x: [B, S, H, D]; freqs_cis: [S, D / 2, 2] (cos, sin) in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def check_inputs(qkv, freqs_cis, k_cache, v_cache, input_pos) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must be one [B, H_kv, S, D] shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    if qkv.dim() == 4 and qkv.dtype != torch.float32:
        raise TypeError(f"decode_attention: a 4-d qkv holds fp32 partial sums [P, B, 1, W], got {qkv.dtype}")
    row = qkv[0] if qkv.dim() == 4 and qkv.shape[0] else qkv
    if row.dim() != 3 or row.shape[1] != 1:
        raise ValueError(f"decode_attention: qkv must be [B, 1, (H + 2 H_kv) D] (one token), or fp32 partial sums "
                         f"[P, B, 1, (H + 2 H_kv) D], got {tuple(qkv.shape)}")
    h = row.shape[2] // d - 2 * hkv
    if row.shape[2] % d or h <= 0 or h % hkv or row.shape[0] > k_cache.shape[0]:
        raise ValueError(f"decode_attention: qkv {tuple(qkv.shape)} does not match the cache {tuple(k_cache.shape)} "
                         f"(width (H + 2 x {hkv}) x {d} with H a multiple of {hkv}, batch within the cache's)")
    if d % 2 or tuple(freqs_cis.shape) != (1, d // 2, 2) or freqs_cis.dtype != torch.float32:
        raise ValueError(f"decode_attention: freqs_cis must be the position's float32 [1, {d // 2}, 2] RoPE table row "
                         f"(even head size), got {tuple(freqs_cis.shape)} {freqs_cis.dtype}")
    if k_cache.dtype != v_cache.dtype or (qkv.dim() == 3 and qkv.dtype != k_cache.dtype):
        raise TypeError(f"decode_attention: qkv and the caches must share a dtype, got {qkv.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if input_pos.numel() != 1 or input_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: input_pos must hold one integer position, got {tuple(input_pos.shape)} {input_pos.dtype}")
    if len({t.device for t in (qkv, freqs_cis, k_cache, v_cache, input_pos)}) != 1:
        raise ValueError("decode_attention: qkv, freqs_cis, the caches and input_pos must be on one device")


def cached_attention(qkv, freqs_cis, k_cache, v_cache, input_pos, mask):
    """Attention in PyTorch, as the model's prefill runs it: qkv [B, S, (H + 2 H_kv) D] at positions input_pos [S];
    RoPE on q and k (freqs_cis: [S, D / 2, 2]), k and v written into the caches there, then attention over the whole
    cache under mask [.., S, max_seq_length] (True: attend). Returns [B, S, H D]."""
    b, s = qkv.shape[:2]
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.view(b, s, -1, d).split([qkv.shape[2] // d - 2 * hkv, hkv, hkv], dim=2)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k_cache[:b, :, input_pos] = k
    v_cache[:b, :, input_pos] = v
    rep = q.shape[1] // hkv
    keys = k_cache[:b].repeat_interleave(rep, dim=1)
    values = v_cache[:b].repeat_interleave(rep, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0)
    return y.transpose(1, 2).reshape(b, s, -1)


def decode_attention_reference(qkv, freqs_cis, k_cache, v_cache, input_pos):
    """The model's prefill path for one token: causal attention over the positions up to input_pos."""
    if qkv.dim() == 4:
        qkv = add_partials(qkv, k_cache.dtype)
    mask = torch.arange(k_cache.shape[2], device=qkv.device) <= input_pos.reshape(())
    return cached_attention(qkv, freqs_cis, k_cache, v_cache, input_pos, mask[None, None, None, :])


def decode_attention_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos):
    """The op on CPU: the reference's arithmetic in fewer operations (a decode step on CPU is bound by the cost of
    each): RoPE on q and k at once, attention over the written positions only, query heads grouped by KV head."""
    if qkv.dim() == 4:
        qkv = add_partials(qkv, k_cache.dtype)
    b, hkv, d = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    h = qkv.shape[2] // d - 2 * hkv
    qk = apply_rotary_emb(qkv[:, :, :(h + hkv) * d].view(b, 1, h + hkv, d), freqs_cis)[:, 0]  # [B, H + H_kv, D]
    pos = int(input_pos.reshape(()))
    k_cache[:b, :, pos] = qk[:, h:]
    v_cache[:b, :, pos] = qkv[:, 0, (h + hkv) * d:].view(b, hkv, d)
    q = qk[:, :h].view(b, hkv, h // hkv, d)  # the query heads of each KV head
    scores = torch.matmul(q.float(), k_cache[:b, :, :pos + 1].float().transpose(-1, -2)) * d ** -0.5
    y = torch.matmul(torch.softmax(scores, dim=-1), v_cache[:b, :, :pos + 1].float())
    return y.to(k_cache.dtype).view(b, 1, h * d)


def decode_step_attention(qkv, freqs_cis, k_cache, v_cache, input_pos):
    """What a decode step calls: teal::decode_attention, except in an eager CPU step, which calls the op's CPU path
    directly (there the op's dispatch and input checks are a cost per layer)."""
    if qkv.device.type == "cpu" and not torch.compiler.is_compiling():
        return decode_attention_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos)
    return decode_attention(qkv, freqs_cis, k_cache, v_cache, input_pos)


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


@torch.library.custom_op("teal::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, freqs_cis: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """One token's attention from its qkv projection [B, 1, (H + 2 H_kv) D] (q, k, v heads in that order): RoPE on q
    and k (freqs_cis: the position's [1, D / 2, 2] table row), k and v written into the caches [B', H_kv, S, D] at
    input_pos, then softmax(q k^T / sqrt(D)) v over cache positions 0..input_pos. Returns [B, 1, H D].
    qkv may also come as the fp32 partial sums [P, B, 1, (H + 2 H_kv) D] of a sparse projection that left its split-K
    reduction to this op (sparse.py): they are added in order and rounded to the caches' dtype as they load."""
    check_inputs(qkv, freqs_cis, k_cache, v_cache, input_pos)
    if qkv.is_cuda:
        return decode_attention_triton(qkv, freqs_cis, k_cache, v_cache, input_pos)
    return decode_attention_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos)


@decode_attention.register_fake
def _(qkv, freqs_cis, k_cache, v_cache, input_pos):
    return k_cache.new_empty((qkv.shape[-3], 1, qkv.shape[-1] - 2 * k_cache.shape[1] * k_cache.shape[3]))
