"""The decode-attention kernel (sparse_gemv/attention_kernel.py: RoPE, cache write, attention) under TRITON_INTERPRET=1
against float64 math."""
import pytest
import torch

from attention import decode_attention, decode_attention_reference
from sparse_gemv import add_partials
from sparse_gemv.attention_kernel import decode_attention_triton

# Relative to the output's scale: fp32 products are exact up to summation order; bf16/fp16 round p and the
# products' operands to 8/11 mantissa bits.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rope64(x, pos, base=10000.0):
    """float64 RoPE of x [B, H, 1, D] at position pos: (even, odd) pairs rotated by pos / base^(2i/D)."""
    d = x.shape[-1]
    angle = pos / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    even, odd = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack([even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()], dim=-1)
    return out.flatten(-2)


def freqs_row(d, pos, base=10000.0):
    angle = torch.tensor(float(pos), dtype=torch.float32) / base ** (torch.arange(0, d, 2).float() / d)
    return torch.stack([angle.cos(), angle.sin()], dim=-1)[None]  # [1, D / 2, 2], as model.precompute_freqs_cis


def split_heads(qkv, hkv, d):
    """[B, 1, (H + 2 H_kv) D] -> q [B, H, 1, D], k and v [B, H_kv, 1, D]."""
    b = qkv.shape[0]
    q, k, v = qkv.view(b, 1, -1, d).split([qkv.shape[2] // d - 2 * hkv, hkv, hkv], dim=2)
    return (t.transpose(1, 2) for t in (q, k, v))


def math_attention(qkv, k_cache, v_cache, pos):
    """float64: RoPE on q and k, the cache rows before pos plus the new k and v, softmax(q k^T / sqrt(D)) v;
    returned as [B, 1, H D] like the op."""
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = split_heads(qkv, hkv, d)
    b, h = q.shape[:2]
    keys = torch.cat([k_cache[:b, :, :pos].double(), rope64(k, pos)], dim=2).repeat_interleave(h // hkv, dim=1)
    values = torch.cat([v_cache[:b, :, :pos].double(), v.double()], dim=2).repeat_interleave(h // hkv, dim=1)
    scores = rope64(q, pos) @ keys.transpose(-1, -2) / d ** 0.5
    return (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(b, 1, h * d)


def make(b, h, hkv, s, d, pos, dtype, seed=0, cache_batch=None):
    """One token's qkv row, its RoPE row, and caches whose rows after pos (not written yet) hold NaN, so reading
    one shows up. The row at pos is stale: the op writes it."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g).to(dtype)
    k_cache = torch.randn(cache_batch or b, hkv, s, d, generator=g).to(dtype)
    v_cache = torch.randn(cache_batch or b, hkv, s, d, generator=g).to(dtype)
    k_cache[:, :, pos + 1:] = float("nan")
    v_cache[:, :, pos + 1:] = float("nan")
    return qkv, freqs_row(d, pos), k_cache, v_cache, torch.tensor([pos], dtype=torch.int32)


def check(out, before, after, args, pos, dtype, exact_v=True):
    """The output against float64 math; the caches: row pos holds the rotated k and v (exact_v: v bit for bit, else
    within one rounding), every other row is untouched."""
    qkv = args[0]
    k_before, v_before = before
    k_after, v_after = after
    _, k, v = split_heads(qkv, k_before.shape[1], k_before.shape[3])
    b = qkv.shape[0]
    want = math_attention(qkv, k_before, v_before, pos)
    assert out.shape == want.shape and out.dtype == dtype
    err = (out.double() - want).abs().max() / want.abs().max()
    assert torch.isfinite(out).all() and err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]}"
    # The cache row is the rotation rounded once to the dtype (fp32 math, as the model's RoPE): within one rounding.
    torch.testing.assert_close(k_after[:b, :, pos:pos + 1].double(), rope64(k, pos), rtol=TOL[dtype], atol=TOL[dtype])
    if exact_v:
        assert torch.equal(v_after[:b, :, pos:pos + 1], v)
    else:
        torch.testing.assert_close(v_after[:b, :, pos:pos + 1].double(), v.double(), rtol=TOL[dtype], atol=TOL[dtype])
    untouched = torch.ones(k_before.shape[2], dtype=torch.bool, device=k_before.device)
    untouched[pos] = False
    for before_, after_ in ((k_before, k_after), (v_before, v_after)):
        assert torch.equal(after_[:, :, untouched].nan_to_num(7.0), before_[:, :, untouched].nan_to_num(7.0))
        assert torch.equal(after_[b:].nan_to_num(7.0), before_[b:].nan_to_num(7.0))  # batch rows past q's


def run(fn, args, **kw):
    before = (args[2].clone(), args[3].clone())
    out = fn(*args, **kw)
    return out, before, (args[2], args[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,d,cache_batch", [(1, 4, 1, 64, None), (2, 9, 3, 64, 3), (1, 4, 4, 40, None)])
@pytest.mark.parametrize("pos", [0, 37, 99])
def test_one_launch_matches_math(dtype, b, h, hkv, d, cache_batch, pos):
    args = make(b, h, hkv, 100, d, pos, dtype, cache_batch=cache_batch)
    out, before, after = run(decode_attention_triton, args, chunk=128, block_s=16)
    check(out, before, after, args, pos, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 15, 16, 70, 127])
def test_split_cache_combines_to_math(dtype, pos):
    # 128 positions in splits of 16: the split holding pos writes the new row; splits past pos are empty and must
    # weigh nothing in the combine.
    args = make(2, 8, 2, 128, 64, pos, dtype, seed=pos)
    out, before, after = run(decode_attention_triton, args, chunk=16, block_s=16)
    check(out, before, after, args, pos, dtype)


@pytest.mark.parametrize("batch, pos", [(1, 20), (2, 0), (2, 49)])
def test_op_on_cpu_matches_the_reference_and_math(batch, pos):
    # The CPU path attends over the written positions only (the reference over the whole cache, masked): equal caches,
    # and outputs within fp32 rounding of a different summation order (1e-6). The caches are bit-equal because ATen's
    # CPU complex product (the CPU path's RoPE) rounds each product and the sum as apply_rotary_emb's real arithmetic
    # does, unfused; a build that contracts it into FMAs would differ in the last bit of the K cache.
    args = make(batch, 9, 3, 50, 64, pos, torch.float32)
    args[2].nan_to_num_(0.0), args[3].nan_to_num_(0.0)  # SDPA's masked softmax multiplies masked positions by zero
    ref_args = tuple(a.clone() for a in args)
    out, before, after = run(decode_attention, args)
    torch.testing.assert_close(out, decode_attention_reference(*ref_args), rtol=1e-6, atol=1e-6)
    assert torch.equal(after[0], ref_args[2]) and torch.equal(after[1], ref_args[3])
    check(out, before, after, args, pos, torch.float32)


def partial_sums(qkv, parts, seed=0):
    """fp32 partial sums [parts, ...] of a qkv row (random splits of it, as a K-split projection leaves them)."""
    g = torch.Generator().manual_seed(seed)
    shares = torch.randn(parts - 1, *qkv.shape, generator=g)
    return torch.cat([shares, (qkv.float() - shares.sum(0))[None]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parts,chunk", [(1, 128), (3, 128), (2, 16)])
def test_partial_sums_are_added_as_the_row_they_round_to(dtype, parts, chunk):
    # q/k/v arriving as fp32 partial sums (a compiled sparse projection's, sparse.py) give what the row they add up
    # to, rounded to the caches' dtype, gives (output and cache rows): exactly in fp32, and in bf16 within float64
    # math's tolerance, since the interpreter rounds fp32 to bf16 toward zero where the GPU and torch round to
    # nearest (test_gpu.py checks bf16 bit for bit).
    args = make(2, 8, 2, 100, 64, 41, dtype, seed=parts)
    qkv_parts = partial_sums(args[0], parts, seed=parts)
    row = add_partials(qkv_parts, dtype)
    out, before, after = run(decode_attention_triton, (qkv_parts, *args[1:]), chunk=chunk, block_s=16)
    assert out.dtype == dtype
    if dtype == torch.float32:
        plain = (row, *(a.clone() for a in args[1:]))
        want, _, want_after = run(decode_attention_triton, plain, chunk=chunk, block_s=16)
        assert torch.equal(out, want)
        for got_cache, want_cache in zip(after, want_after):  # rows past the position hold NaN in both
            assert torch.equal(got_cache.nan_to_num(7.0), want_cache.nan_to_num(7.0))
    check(out, before, after, (row, *args[1:]), 41, dtype, exact_v=dtype == torch.float32)
    # the op's CPU path takes them too, as the reference of the row they add up to
    ref_args = make(2, 8, 2, 100, 64, 41, dtype, seed=parts)
    for a in ref_args[2:4]:
        a.nan_to_num_(0.0)
    ref = decode_attention(qkv_parts, *(a.clone() for a in ref_args[1:]))
    # it attends over the written positions only, the reference over the masked cache: a different summation order,
    # within fp32 rounding (1e-6) or two bf16 steps (rtol 2^-6, atol 1e-3)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-3)
    torch.testing.assert_close(ref, decode_attention_reference(row, *ref_args[1:]), **tol)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_op_compiles_without_graph_breaks_and_writes_the_cache(backend):
    # The caches are mutated in place by the op: compiled, they must end up as eager leaves them.
    args = make(1, 4, 2, 32, 64, 10, torch.float32)
    args[2].nan_to_num_(0.0), args[3].nan_to_num_(0.0)
    eager_args = tuple(a.clone() for a in args)
    compiled = torch.compile(decode_attention, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*args), decode_attention(*eager_args), rtol=1e-6, atol=1e-6)
    assert torch.equal(args[2], eager_args[2]) and torch.equal(args[3], eager_args[3])
    torch._dynamo.reset()


@pytest.mark.parametrize("bad,match", [
    (lambda qkv, f, kc, vc, p: (qkv.expand(1, 2, 512), f, kc, vc, p), "one token"),
    (lambda qkv, f, kc, vc, p: (qkv, f, kc, vc[:, :, :8], p), "one .* shape"),
    (lambda qkv, f, kc, vc, p: (qkv[..., :-64], f, kc, vc, p), "multiple of 2"),
    (lambda qkv, f, kc, vc, p: (qkv[..., :-1], f, kc, vc, p), "width"),
    (lambda qkv, f, kc, vc, p: (torch.cat([qkv, qkv]), f, kc, vc, p), "batch within"),
    (lambda qkv, f, kc, vc, p: (qkv, f[:, :5], kc, vc, p), "RoPE table row"),
    (lambda qkv, f, kc, vc, p: (qkv, f.double(), kc, vc, p), "RoPE table row"),
    (lambda qkv, f, kc, vc, p: (qkv.half(), f, kc, vc, p), "share a dtype"),
    (lambda qkv, f, kc, vc, p: (qkv, f, kc, vc, torch.tensor([1, 2])), "one integer position"),
    (lambda qkv, f, kc, vc, p: (qkv, f, kc, vc, p.float()), "one integer position"),
    (lambda qkv, f, kc, vc, p: (qkv[None].half(), f, kc, vc, p), "fp32 partial sums"),
    (lambda qkv, f, kc, vc, p: (qkv[None][:0], f, kc, vc, p), "one token"),
    (lambda qkv, f, kc, vc, p: (qkv[None].expand(2, 1, 2, 512), f, kc, vc, p), "one token"),
])
def test_bad_inputs_are_refused(bad, match):
    args = make(1, 4, 2, 16, 64, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(*bad(*args))
