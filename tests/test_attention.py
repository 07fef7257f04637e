"""The decode-attention kernel (attention.py) under TRITON_INTERPRET=1 against float64 softmax attention."""
import pytest
import torch

from attention import decode_attention, decode_attention_reference, decode_attention_triton

# Relative to the output's scale: fp32 products are exact up to summation order; bf16/fp16 round p and the
# products' operands to 8/11 mantissa bits.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def math_attention(q, k_cache, v_cache, pos):
    """float64 softmax(q k^T / sqrt(D)) v over positions 0..pos, query head h reading KV head h // rep."""
    b, h, _, d = q.shape
    rep = h // k_cache.shape[1]
    k = k_cache[:, :, : pos + 1].double().repeat_interleave(rep, dim=1)
    v = v_cache[:, :, : pos + 1].double().repeat_interleave(rep, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / d ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def make(b, h, hkv, s, d, pos, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)  # the model's strided [B, H, 1, D] view
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    # Positions after pos are not written yet: poison them, so reading one shows up as NaN.
    k[:, :, pos + 1:] = float("nan")
    v[:, :, pos + 1:] = float("nan")
    return q, k, v, torch.tensor([pos], dtype=torch.int32)


def check(out, q, k, v, pos, dtype):
    want = math_attention(q, k, v, pos)
    assert out.shape == want.shape and out.dtype == dtype
    err = (out.double() - want).abs().max() / want.abs().max()
    assert torch.isfinite(out).all() and err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hkv,d", [(1, 4, 1, 64), (2, 9, 3, 64), (1, 4, 4, 40)])
@pytest.mark.parametrize("pos", [0, 37, 99])
def test_one_launch_matches_math(dtype, b, h, hkv, d, pos):
    q, k, v, p = make(b, h, hkv, 100, d, pos, dtype)
    check(decode_attention_triton(q, k, v, p, chunk=128, block_s=16), q, k, v, pos, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 15, 16, 70, 127])
def test_split_cache_combines_to_math(dtype, pos):
    # 128 positions in splits of 16: splits past pos are empty and must weigh nothing in the combine.
    q, k, v, p = make(2, 8, 2, 128, 64, pos, dtype, seed=pos)
    check(decode_attention_triton(q, k, v, p, chunk=16, block_s=16), q, k, v, pos, dtype)


def test_op_on_cpu_is_the_reference_and_matches_math():
    q, k, v, p = make(1, 9, 3, 50, 64, 20, torch.float32)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # SDPA's masked softmax multiplies masked positions by zero weight
    out = decode_attention(q, k, v, p)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, p), rtol=0, atol=0)
    check(out, q, k, v, 20, torch.float32)


def test_op_compiles_without_graph_breaks():
    q, k, v, p = make(1, 4, 2, 32, 64, 10, torch.float32)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    compiled = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, p), decode_attention(q, k, v, p), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v, p: (q.expand(1, 4, 2, 64), k, v, p), "one token"),
    (lambda q, k, v, p: (q, k, v[:, :, :8], p), "one .* shape"),
    (lambda q, k, v, p: (q[:, :3], k, v, p), "multiple of KV heads"),
    (lambda q, k, v, p: (q.half(), k, v, p), "share a dtype"),
    (lambda q, k, v, p: (q, k, v, torch.tensor([1, 2])), "one integer position"),
    (lambda q, k, v, p: (q, k, v, p.float()), "one integer position"),
])
def test_bad_inputs_are_refused(bad, match):
    q, k, v, p = make(1, 4, 2, 16, 64, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(*bad(q, k, v, p))
