"""Device functions of one token's attention, shared by the attention kernel (attention_kernel.py) and the persistent
decode kernel (persistent.py): loading the token's q/k/v, RoPE on interleaved pairs (and Qwen3's per-head q/k norm
before it), and the online-softmax pass over a span of the KV cache."""
import triton
import triton.language as tl


@triton.jit
def load_qkv(ptrs, mask, part_stride, PARTS: tl.constexpr, dtype: tl.constexpr, CACHE: tl.constexpr):
    """Elements of the token's qkv row, in fp32 holding dtype values. With PARTS > 0 the row arrives as that many fp32
    partial sums over slices of K (a sparse projection's, teal::sparse_gemv_partials, part_stride apart): added in
    order and rounded to dtype once, as the projection's own reduction rounds its output. CACHE: the loads' cache
    modifier (".cg" for a row another program of the same launch wrote)."""
    if PARTS == 0:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32)
    total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=CACHE)
    for part in tl.static_range(1, PARTS):
        total += tl.load(ptrs + part * part_stride, mask=mask, other=0.0, cache_modifier=CACHE)
    return total.to(dtype).to(tl.float32)


@triton.jit
def rope(ptrs, mask, cos, sin, part_stride, PARTS: tl.constexpr, dtype: tl.constexpr, CACHE: tl.constexpr):
    """Load interleaved (even, odd) pairs at ptrs (even elements) and rotate them by the position's angles in fp32,
    rounded to dtype, as apply_rotary_emb does; returned as [..., pairs, 2] (reshaped by the caller)."""
    even = load_qkv(ptrs, mask, part_stride, PARTS, dtype, CACHE)
    odd = load_qkv(ptrs + 1, mask, part_stride, PARTS, dtype, CACHE)
    return rotate(even, odd, cos, sin, dtype)


@triton.jit
def rotate(even, odd, cos, sin, dtype: tl.constexpr):
    """RoPE's rotation of (even, odd) pairs in fp32, rounded to dtype: [..., pairs, 2]."""
    return tl.join((even * cos - odd * sin).to(dtype), (odd * cos + even * sin).to(dtype))


@triton.jit
def rms_norm_pairs(even, odd, w_ptrs, mask, eps, D: tl.constexpr, dtype: tl.constexpr):
    """Qwen3's q/k norm: model.RMSNorm over each head of D elements held as (even, odd) pairs along the last axis (fp32
    holding dtype values; masked pairs 0), times the weight's even and odd elements at w_ptrs, rounded as the model
    rounds (the normalised value to dtype, then its product with the weight)."""
    rs = tl.math.rsqrt(tl.sum(even * even + odd * odd, axis=-1, keep_dims=True) / D + eps)
    w_even = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    even = ((even * rs).to(dtype).to(tl.float32) * w_even).to(dtype).to(tl.float32)
    odd = ((odd * rs).to(dtype).to(tl.float32) * w_odd).to(dtype).to(tl.float32)
    return even, odd


@triton.jit
def attend(q, k_base, v_base, start, end, stride_ks, offs_d, d_mask, sm_scale, BLOCK_H: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax of q [BLOCK_H, BLOCK_D] (query heads padded to BLOCK_H >= 16 rows, which makes both products
    tensor-core shaped) against cache positions start..end-1 at k_base / v_base: returns the running max m, the sum
    of exponentials l (both [BLOCK_H], l = 0 for an empty span) and the unnormalised output acc [BLOCK_H, BLOCK_D]."""
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
    return m, l, acc
