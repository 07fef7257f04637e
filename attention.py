"""A decode step's attention: the `teal::decode_attention` op, its PyTorch reference and CPU path, and the model's
prefill attention. On CUDA the op runs one Triton kernel (sparse_gemv/attention_kernel.py): RoPE, the cache write and
the attention over the positions written so far.
"""
import torch

from sparse_gemv.ops import add_partials


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
    # RoPE as a complex product: apply_rotary_emb's arithmetic (the same two products and sum per element) in one
    # operation instead of a dozen
    pairs = torch.view_as_complex(qkv[:, 0, :(h + hkv) * d].float().view(b, h + hkv, d // 2, 2))
    qk = torch.view_as_real(pairs * torch.view_as_complex(freqs_cis)).view(b, h + hkv, d).to(qkv.dtype)
    pos = int(input_pos.reshape(()))
    k_cache[:b, :, pos] = qk[:, h:]
    v_cache[:b, :, pos] = qkv[:, 0, (h + hkv) * d:].view(b, hkv, d)
    q = qk[:, :h].reshape(b * hkv, h // hkv, d)  # the query heads of each KV head
    keys, values = (cache[:b, :, :pos + 1].flatten(0, 1).float() for cache in (k_cache, v_cache))  # [B H_kv, P, D]
    scores = torch.bmm(q.float(), keys.transpose(1, 2)).mul_(d ** -0.5)
    y = torch.bmm(torch.softmax(scores, dim=-1), values)
    return y.to(k_cache.dtype).view(b, 1, h * d)


def decode_step_attention(qkv, freqs_cis, k_cache, v_cache, input_pos):
    """What a decode step calls: teal::decode_attention, except in an eager CPU step, which calls the op's CPU path
    directly (there the op's dispatch and input checks are a cost per layer)."""
    if qkv.device.type == "cpu" and not torch.compiler.is_compiling():
        return decode_attention_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos)
    return decode_attention(qkv, freqs_cis, k_cache, v_cache, input_pos)


@torch.library.custom_op("teal::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, freqs_cis: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """One token's attention from its qkv projection [B, 1, (H + 2 H_kv) D] (q, k, v heads in that order): RoPE on q
    and k (freqs_cis: the position's [1, D / 2, 2] table row), k and v written into the caches [B', H_kv, S, D] at
    input_pos, then softmax(q k^T / sqrt(D)) v over cache positions 0..input_pos. Returns [B, 1, H D].
    qkv may also come as the fp32 partial sums [P, B, 1, (H + 2 H_kv) D] of a sparse projection that left its split-K
    reduction to this op (sparse.py): they are added in order and rounded to the caches' dtype as they load."""
    check_inputs(qkv, freqs_cis, k_cache, v_cache, input_pos)
    if qkv.is_cuda:  # triton is imported where its kernel launches: a CPU install runs without it
        from sparse_gemv.attention_kernel import decode_attention_triton
        return decode_attention_triton(qkv, freqs_cis, k_cache, v_cache, input_pos)
    return decode_attention_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos)


@decode_attention.register_fake
def _(qkv, freqs_cis, k_cache, v_cache, input_pos):
    return k_cache.new_empty((qkv.shape[-3], 1, qkv.shape[-1] - 2 * k_cache.shape[1] * k_cache.shape[3]))
