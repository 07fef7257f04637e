"""GPU-only checks of the Triton kernels (on the GPU machine: TRITON_INTERPRET=0 python -m pytest -m gpu)."""
import pytest
import torch

from sparse_gemv import sparse_gemv, sparse_gemv_reference
from sparse_gemv.kernels import sparse_gemv_triton

pytestmark = pytest.mark.gpu

# Relative Frobenius error against the float64 reference: fp32 accumulation of bf16/fp16 products.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


# Both kernel variants at explicit configs, and None: the op with pick_config's choice (both variants). The unsplit
# compact config lists kept rows in several chunks (MAX_LIST_CHUNK) on the long-K shapes, carrying the count across.
VARIANTS = [None, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "COMPACT": False, "STAGES": 3, "num_warps": 4},
            {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 8, "COMPACT": True, "STAGES": 3, "num_warps": 4},
            {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "COMPACT": True, "STAGES": 3, "num_warps": 4}]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("k,groups", [(4096, [4096, 1024, 1024]), (14336, [4096]), (1000, [333, 77]), (576, [576, 192, 192])])
def test_kernel_matches_reference(variant, dtype, per_channel, tokens, k, groups):
    g = torch.Generator(device="cuda").manual_seed(tokens * 7 + k)
    x = torch.randn(tokens, k, dtype=dtype, device="cuda", generator=g)
    w = torch.randn(k, sum(groups), dtype=dtype, device="cuda", generator=g) / k ** 0.5
    shape = (len(groups), k) if per_channel else (len(groups),)
    thr = torch.rand(shape, device="cuda", generator=g) * 1.5
    if VARIANTS[variant] is None or tokens > 8:  # above 8 tokens the op takes the dense path
        y = sparse_gemv(x, w, thr, groups, compact=bool(tokens % 2))
    else:
        y = sparse_gemv_triton(x, w, thr, groups, config=VARIANTS[variant])
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("k,groups", [(14336, [4096]), (4096, [4096]), (1000, [333, 77])])
def test_partial_sums_add_up_to_the_product(variant, dtype, tokens, k, groups):
    # sparse_gemv_partials (the o and down projections under torch.compile): fp32 [SPLIT_K, T, N] whose sum over
    # the splits is the masked product, at pick_config's reduce=False choice (the op) and at explicit configs.
    from sparse_gemv.kernels import pick_config
    g = torch.Generator(device="cuda").manual_seed(tokens + k + 1)
    x = torch.randn(tokens, k, dtype=dtype, device="cuda", generator=g)
    w = torch.randn(k, sum(groups), dtype=dtype, device="cuda", generator=g) / k ** 0.5
    thr = torch.rand(len(groups), device="cuda", generator=g) * 1.5
    if VARIANTS[variant] is None:
        parts = torch.ops.teal.sparse_gemv_partials(x, w, thr, groups, bool(tokens % 2))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert parts.shape[0] == pick_config(k, groups, bool(tokens % 2), sms, reduce=False)["SPLIT_K"]
    else:
        parts = sparse_gemv_triton(x, w, thr, groups, config=VARIANTS[variant], reduce=False)
        assert parts.shape[0] == VARIANTS[variant]["SPLIT_K"]
    assert parts.dtype == torch.float32 and parts.shape[1:] == (tokens, sum(groups))
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    assert rel_err(parts.sum(0), ref) < 1e-4  # fp32 sums of exact products, never rounded to the input dtype


def test_split_k_reduction_is_race_free():
    x = torch.randn(1, 14336, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(14336, 4096, dtype=torch.bfloat16, device="cuda")
    thr = torch.tensor([0.5], device="cuda")
    first = sparse_gemv(x, w, thr, [4096])
    for _ in range(200):
        assert torch.equal(sparse_gemv(x, w, thr, [4096]), first)


def test_op_under_compile_and_cuda_graph_follows_threshold_changes():
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 6144, dtype=torch.bfloat16, device="cuda")
    thr = torch.zeros(3, device="cuda")
    f = torch.compile(lambda a: torch.ops.teal.sparse_gemv(a, w, thr, [4096, 1024, 1024]), mode="reduce-overhead",
                      fullgraph=True)
    for t in (0.0, 0.5, 1.0, 0.2):
        thr.fill_(t)
        for _ in range(3):
            y = f(x)
        ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), [4096, 1024, 1024])
        assert rel_err(y, ref) < 1e-2


def test_programmatic_dependent_launch_waits_for_the_previous_kernel():
    # A chain where every GEMV reads what the kernel before it wrote (the sparse GEMV itself, or an inductor
    # kernel in between), captured in a CUDA graph with programmatic dependent launch on: a kernel that read its
    # input before the previous one finished would change the result. The kernel is deterministic (fixed-order
    # split-K sums), so the chain must equal, bit for bit, the same chain run eagerly without PDL.
    import generate
    from sparse_gemv import kernels
    g = torch.Generator(device="cuda").manual_seed(5)
    ws = [torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda", generator=g) / 64 for _ in range(6)]
    thr = torch.full((1,), 0.5, device="cuda")
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda", generator=g)

    def chain(a):
        for w in ws:
            a = torch.ops.teal.sparse_gemv(a, w, thr, [4096])
            a = -a  # compiled: an inductor kernel between each pair of GEMVs (exact, so eager and compiled agree)
        return a

    try:
        generate.set_pdl(False)
        expected = chain(x)
        assert expected.abs().max() > 0.1
        generate.set_pdl(True)
        assert kernels.PDL
        compiled = torch.compile(chain, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):
            got = compiled(x)
            assert torch.equal(got, expected)
    finally:
        generate.set_pdl(True)
        torch._dynamo.reset()


@pytest.mark.parametrize("cache_len", [205, 1000, 8192])
@pytest.mark.parametrize("rep", [1, 4])
def test_decode_attention_on_gpu_matches_math(cache_len, rep):
    # One launch up to 256 positions, split (with the combine kernel) above; positions past pos hold NaN,
    # so reading one fails; the new k and v land in row pos and nowhere else. bf16 tolerance as in test_attention.py.
    from attention import decode_attention
    from test_attention import check, make
    for pos in (0, cache_len // 3, cache_len - 1):
        args = tuple(t.cuda() for t in make(1, 8 * rep, 8, cache_len, 128, pos, torch.bfloat16, seed=pos))
        before = (args[2].clone(), args[3].clone())
        check(decode_attention(*args), before, (args[2], args[3]), args, pos, torch.bfloat16)


def test_decode_attention_adds_partial_sums_as_the_row_they_round_to():
    # bf16 q/k/v arriving as fp32 partial sums (the compiled sparse q/k/v projection's) give, bit for bit, what the
    # row they add up to, rounded to bf16 by torch, gives: the output and the new cache rows.
    from attention import decode_attention
    from sparse_gemv import add_partials
    from test_attention import make, partial_sums
    for parts, cache_len in ((2, 205), (3, 1000)):
        args = tuple(t.cuda() for t in make(1, 32, 8, cache_len, 128, cache_len // 2, torch.bfloat16, seed=parts))
        qkv_parts = partial_sums(args[0].cpu(), parts, seed=parts).cuda()
        plain = (add_partials(qkv_parts, torch.bfloat16), *(a.clone() for a in args[1:]))
        assert torch.equal(decode_attention(qkv_parts, *args[1:]), decode_attention(*plain))
        for got, want in ((args[2], plain[2]), (args[3], plain[3])):
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


def test_decode_attention_in_a_cuda_graph_follows_the_position():
    # Replays of one captured launch at new positions: each writes its own row of the caches (buffers of a module, as
    # in the model) and reads the rows before it.
    from attention import decode_attention
    from model import precompute_freqs_cis
    from test_attention import math_attention, rope64, split_heads

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator(device="cuda").manual_seed(0)
            self.register_buffer("k_cache", torch.randn(1, 8, 2048, 128, dtype=torch.bfloat16, device="cuda", generator=g))
            self.register_buffer("v_cache", torch.randn(1, 8, 2048, 128, dtype=torch.bfloat16, device="cuda", generator=g))
            self.register_buffer("freqs_cis", precompute_freqs_cis(2048, 128, 10000.0).cuda())

        def forward(self, qkv, pos):
            return decode_attention(qkv, self.freqs_cis[pos], self.k_cache, self.v_cache, pos)

    layer = Layer()
    qkv = torch.randn(1, 1, 48 * 128, dtype=torch.bfloat16, device="cuda")
    _, k, v = split_heads(qkv, 8, 128)
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    f = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for p in (3, 300, 2047, 17):
        pos.fill_(p)
        before = layer.k_cache.clone(), layer.v_cache.clone()
        for _ in range(3):
            y = f(qkv, pos)
        want = math_attention(qkv, *before, p)
        assert float((y.double() - want).abs().max() / want.abs().max()) < 3e-2
        torch.testing.assert_close(layer.k_cache[:, :, p:p + 1].double(), rope64(k, p), rtol=3e-2, atol=3e-2)
        assert torch.equal(layer.v_cache[:, :, p:p + 1], v)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 5])  # the op runs compact for odd counts, predicated for even ones
@pytest.mark.parametrize("k,groups", [(4096, [4096, 1024, 1024]), (14336, [4096]), (4096, [14336, 14336])])
def test_int8_weights_match_the_dequantized_product(variant, dtype, tokens, k, groups):
    # int8 weights with per-output-column scales, at the decode shapes: against the float64 masked product with the
    # dequantized weight, as reduced output and as partial sums.
    from sparse import quantize_int8
    g = torch.Generator(device="cuda").manual_seed(tokens + k + len(groups))
    x = torch.randn(tokens, k, dtype=dtype, device="cuda", generator=g)
    q, scales = quantize_int8(torch.randn(sum(groups), k, device="cuda", generator=g) / k ** 0.5)
    w_t = q.t().contiguous()
    thr = torch.rand(len(groups), device="cuda", generator=g) * 1.5
    ref = sparse_gemv_reference(x.double(), (q.double() * scales.double()[:, None]).t(), thr.double(), groups)
    config = VARIANTS[variant]
    if config is None:
        y = sparse_gemv(x, w_t, thr, groups, bool(tokens % 2), scales)
        parts = torch.ops.teal.sparse_gemv_partials(x, w_t, thr, groups, False, scales)
    else:
        y = sparse_gemv_triton(x, w_t, thr, groups, config=config, scales=scales)
        parts = sparse_gemv_triton(x, w_t, thr, groups, config=config, reduce=False, scales=scales)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(parts.sum(0), ref) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["int4 g128 zeros", "int4 g32", "int8 g32"])
@pytest.mark.parametrize("tokens", [1, 4, 8])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("k,groups", [(4096, [4096, 1024, 1024]), (14336, [4096]), (4096, [14336, 14336]),
                                      (1000, [336, 80])])
def test_grouped_weights_match_the_dequantized_product(fmt, tokens, compact, k, groups):
    # Group-wise quantized weights (sparse_gemv/grouped.py) at the decode shapes and at a K that is no multiple of the
    # group size, with the op's launch configs: against the float64 masked product of the dequantized weight, reduced
    # and as partial sums; per-channel thresholds for even token counts.
    from sparse import GroupQuant, quantize_groupwise
    from sparse_gemv.quant import dequantize_grouped
    bits, group_size = int(fmt[3]), int(fmt.split()[1][1:])
    quant = GroupQuant(bits, group_size, "zeros" in fmt)
    g = torch.Generator(device="cuda").manual_seed(tokens + k + len(groups))
    x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda", generator=g)
    q, scales, zeros = quantize_groupwise(torch.randn(sum(groups), k, device="cuda", generator=g) / k ** 0.5, quant)
    shape = (len(groups), k) if tokens % 2 == 0 else (len(groups),)
    thr = torch.rand(shape, device="cuda", generator=g) * 1.5
    ref = sparse_gemv_reference(x.double(), dequantize_grouped(q, scales, zeros, group_size, torch.float64),
                                thr.double(), groups)
    y = sparse_gemv(x, q, thr, groups, compact, scales, zeros, group_size)
    parts = torch.ops.teal.sparse_gemv_partials(x, q, thr, groups, compact, scales, zeros, group_size)
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    assert rel_err(parts.sum(0), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("sparse", [False, True, "int8", "int8 mlp-compact", "int4", "int4 mlp-compact", "cats"])
def test_compiled_decode_in_cuda_graphs_matches_eager(sparse):
    # The whole decode step as generate.py runs it (torch.compile reduce-overhead: CUDA graphs over the attention
    # kernel writing the model's cache buffers, and the sparse GEMVs) against the same model run eagerly, step by
    # step on the same tokens, in fp32 so the two paths differ only by summation order.
    import generate
    from model import ModelArgs, Transformer
    from sparse import GroupQuant, catsify, set_cats_thresholds, set_thresholds, sparsify
    torch.manual_seed(0)
    args = ModelArgs(n_layer=2, n_head=8, n_local_heads=2, dim=256, intermediate_size=512, vocab_size=512, block_size=64)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Transformer(args).cuda().float().eval()
        if sparse == "cats":
            catsify(m)
            set_cats_thresholds(m, torch.full((2,), 0.1))
        elif sparse:
            compact = generate.SPARSE_KERNELS["mlp-compact"] if str(sparse).endswith("mlp-compact") else ()
            group_quant = GroupQuant() if str(sparse).startswith("int4") else None
            sparsify(m, int8=str(sparse).startswith("int8"), compact=compact, group_quant=group_quant)
            set_thresholds(m, torch.full((2, 7), 0.5))
        m.setup_caches(1, 64)
        models.append(m)
    eager, compiled = models
    step = torch.compile(generate.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, 512, (1, 5), device="cuda")
    with torch.no_grad():
        eager(prompt, torch.arange(5, device="cuda"))
        compiled(prompt, torch.arange(5, device="cuda"))
        token = prompt[:, -1:]
        for pos in range(5, 40):
            input_pos = torch.tensor([pos], device="cuda")
            want = eager(token, input_pos)
            got = step(compiled, token, input_pos, temperature=0)  # greedy
            assert int(got) == int(want.argmax()), f"position {pos}"
            token = got.view(1, 1).clone()
    torch.testing.assert_close(compiled.layers[1].attention.kv_cache.k_cache, eager.layers[1].attention.kv_cache.k_cache,
                               rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q4_0"])
@pytest.mark.parametrize("k,n", [(576, 49152), (4096, 128256)])
def test_quantized_lm_head_matches_the_dequantized_product(fmt, k, n):
    # A GGUF's LM head kept quantized, through the grouped kernel at threshold 0 (the op with its launch config: no K
    # split at these widths), SmolLM2's and Llama-3-8B's shapes: against the float64 product of the dequantized table.
    from sparse import GroupQuant, quantize_groupwise
    from sparse_gemv.quant import dequantize_grouped
    quant = GroupQuant(8 if fmt == "Q8_0" else 4, 32, fmt == "Q4_1")
    g = torch.Generator(device="cuda").manual_seed(k)
    q, scales, zeros = quantize_groupwise(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5, quant)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda", generator=g)
    y = sparse_gemv(x, q, torch.zeros(1, device="cuda"), [n], False, scales, zeros, 32)
    assert rel_err(y, x.double() @ dequantize_grouped(q, scales, zeros, 32, torch.float64)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("engine", ["per-layer", "persistent"])
def test_quantized_embedding_and_head_in_cuda_graphs_match_eager(engine):
    # The default model's formats at its widths (two layers, random weights, fp32 activations): 4-bit projections in
    # groups of 32 with zeros (Q4_1), and one Q8_0 table for the tied token embedding (QuantizedEmbedding) and the LM
    # head (a SparseLinear at threshold 0). The compiled step (CUDA graphs: the lookup, and the head's grouped kernel
    # after the layers, per-layer or persistent) gives the eager per-layer step's greedy tokens.
    import generate
    from model import ModelArgs, Transformer
    from sparse import GroupQuant, QuantizedEmbedding, SparseLinear, quantize_groupwise, set_thresholds, sparsify
    args = ModelArgs(n_layer=2, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536, vocab_size=49152,
                     block_size=64, tie_embeddings=True)
    table = GroupQuant(8, 32, False)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Transformer(args).cuda().float().eval()
        sparsify(m, group_quant=GroupQuant(4, 32, True))
        set_thresholds(m, torch.full((2, 7), 0.3))
        weight_t, scales, _ = quantize_groupwise(m.tok_embeddings.weight.detach(), table)
        m.tok_embeddings = QuantizedEmbedding(49152, 576, table, torch.float32, device="cuda")
        m.output = SparseLinear(576, 49152, (49152,), group_quant=table, device="cuda")
        m.tok_embeddings.weight_t.data, m.tok_embeddings.scales.data = weight_t, scales
        m.output.weight_t, m.output.scales = m.tok_embeddings.weight_t, m.tok_embeddings.scales
        m.output.reserve_workspace()
        m.setup_caches(1, 64)
        models.append(m)
    eager, compiled = models
    step, _ = generate.decode_step(compiled, engine)
    step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, 49152, (1, 5), device="cuda", dtype=torch.int)
    with torch.no_grad():
        eager(prompt, torch.arange(5, device="cuda"))
        compiled(prompt, torch.arange(5, device="cuda"))
        token = prompt[:, -1:]
        for pos in range(5, 30):
            input_pos = torch.tensor([pos], device="cuda", dtype=torch.int)
            want = eager(token, input_pos)
            got = step(compiled, token, input_pos, temperature=0)
            assert int(got) == int(want.argmax()), f"position {pos}"
            token = got.view(1, 1).clone()
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("d,inter", [(4096, 14336), (576, 1536), (1000, 333)])
def test_cats_kernel_matches_the_formula(dtype, tokens, d, inter):
    from sparse_gemv import cats_gate_up
    g = torch.Generator(device="cuda").manual_seed(tokens + d)
    x = torch.randn(tokens, d, dtype=dtype, device="cuda", generator=g)
    w13 = (torch.randn(2 * inter, d, device="cuda", generator=g) / d ** 0.5).to(dtype)
    thr = torch.tensor([0.25], device="cuda")
    h = cats_gate_up(x, w13, thr).double()
    a = torch.nn.functional.silu(x.double() @ w13[:inter].double().T)
    ref = torch.where(a.abs() > 0.25, a, 0) * (x.double() @ w13[inter:].double().T)
    clear = (a.abs() - 0.25).abs() > 1e-2  # away from the threshold, where summation order cannot flip the mask
    assert torch.equal((h == 0)[clear], (ref == 0)[clear])
    assert rel_err(torch.where(clear, h, 0), torch.where(clear, ref, 0)) < TOL[dtype]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_compiled_sparse_decode_of_each_family_matches_the_masked_reference(family):
    # Qwen2's biased q/k/v and Qwen3's normed q/k summed in the graph ("add") ahead of the attention kernel, Llama-3.2's
    # handed to it as partials: the compiled step (CUDA graphs, the Triton kernels) against the masked PyTorch
    # reference run eagerly on the same tokens, fp32.
    import copy
    import generate
    from sparse import set_thresholds, sparsify
    from tests.test_families import tiny_family_model
    from tests.test_sparse import masked_reference, thresholds_at
    dense = tiny_family_model(family)
    table = thresholds_at(dense, 0.5)  # on the CPU
    dense = dense.cuda()  # before the reference is built: its hooks keep the weights they multiply by
    ref = masked_reference(dense, table)
    sparse = sparsify(copy.deepcopy(dense))
    set_thresholds(sparse, table)
    step = torch.compile(generate.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.tensor([[5, 17, 42, 7]], device="cuda")
    with torch.no_grad():
        for m in (ref, sparse):
            m.setup_caches(1, 64, exact=True)  # anew: .cuda() moved the layers' cache views apart from the stack
            m(prompt, torch.arange(4, device="cuda"))
        token = prompt[:, -1:]
        for pos in range(4, 30):
            input_pos = torch.tensor([pos], device="cuda")
            want = ref(token, input_pos)
            got = step(sparse, token, input_pos, temperature=0)
            assert int(got) == int(want.argmax()), f"position {pos}"
            token = got.view(1, 1).clone()
    torch._dynamo.reset()




def random_model_at_llama3_heads(n_layer, block_size, device, **family):
    """Llama-3-8B's head layout (GQA 32/8 of 128) at narrower widths (or the ModelArgs in `family` instead), every
    parameter random: weights normal with std 1/sqrt(fan-in), norm weights and biases uniform in [0.5, 1.5]."""
    from model import ModelArgs, Transformer
    args = ModelArgs(**{**dict(n_layer=n_layer, n_head=32, n_local_heads=8, dim=4096, intermediate_size=7168,
                               vocab_size=2048, block_size=block_size, rope_base=500000.0), **family})
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    return model


def persistent_model(dtype, int8=False, per_channel=False, sparsity=0.5, n_layer=4, block_size=1100,
                     group_quant=None, **family):
    """random_model_at_llama3_heads made sparse (weights in dtype, int8 or group-wise quantized), with thresholds at
    the `sparsity` quantile of each projection's inputs over a random prefill; caches for block_size positions."""
    from sparse import LAYER_GROUPS, sparse_layers, sparsify
    model = random_model_at_llama3_heads(n_layer, block_size, "cuda", **family)
    model = sparsify(model.to(dtype).eval(), per_channel=per_channel, int8=int8, group_quant=group_quant)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, key=(i, path): inputs.__setitem__(key, a[0]))
             for i, path, layer in sparse_layers(model)]
    model.setup_caches(1, 64)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 64), device="cuda"), torch.arange(64, device="cuda"))
        for h in hooks:
            h.remove()
        for i, path, layer in sparse_layers(model):
            x = inputs[(i, path)].reshape(-1, layer.in_features).abs().float()
            for g in range(len(LAYER_GROUPS[path])):
                flat = x.flatten()[:1 << 20]  # torch.quantile's input limit
                q = torch.quantile(x, sparsity, dim=0) if per_channel else torch.quantile(flat, sparsity)
                layer.thresholds[g].copy_(q if sparsity else torch.zeros_like(q))
    model.setup_caches(1, block_size, exact=True)
    return model


def _quant(name):
    from sparse import GroupQuant
    return {"int4_g128_zeros": GroupQuant(4, 128, True), "int4_g32": GroupQuant(4, 32, False),
            "q8_0": GroupQuant(8, 32, False)}.get(name)


@pytest.mark.parametrize("dtype,int8,per_channel,sparsity,quant", [
    (torch.bfloat16, False, False, 0.0, None), (torch.bfloat16, False, False, 0.5, None),
    (torch.bfloat16, False, True, 0.9, None), (torch.bfloat16, True, False, 0.5, None),
    (torch.bfloat16, True, True, 0.0, None), (torch.float32, False, False, 0.5, None),
    (torch.bfloat16, False, False, 0.5, "int4_g128_zeros"), (torch.bfloat16, False, True, 0.0, "int4_g128_zeros"),
    (torch.bfloat16, False, True, 0.9, "int4_g32"), (torch.bfloat16, False, False, 0.5, "q8_0"),
    (torch.float32, False, False, 0.5, "int4_g128_zeros")])
def test_persistent_decode_matches_stepped_and_per_layer(dtype, int8, per_channel, sparsity, quant):
    """The persistent launch against its stepped mode (the same tiles, partial sums added in the same order: equal
    bits, whichever program took which tile) at every sparsity, and for a dense model against the per-layer path (the
    model's own kernels: for group-wise quantized weights grouped.py's), teacher-forced over 24 steps: logits within
    3% of the largest (bf16 roundings) or 1e-4 (fp32), and the greedy token the same unless the per-layer top two are
    that close. See check_persistent_against_stepped_and_per_layer for why sparse models are not held to the
    per-layer path here."""
    model = persistent_model(dtype, int8, per_channel, sparsity, block_size=64, group_quant=_quant(quant))
    check_persistent_against_stepped_and_per_layer(model, dtype)


# The new families' layers at their models' shapes (fewer layers): Qwen3-0.6B's attention (16 heads of 128 at 1024 wide:
# head_dim is not dim / n_head) with q/k norms, Qwen2.5-7B's widths (3584, 18944; 28 heads over 4 KV heads) with
# q/k/v biases, Llama-3.2-3B's (24 heads over 8) with tied embeddings and its RoPE scaling.
PERSISTENT_FAMILIES = {
    "qwen3": dict(dim=1024, n_head=16, n_local_heads=8, head_dim=128, intermediate_size=3072, qk_norm=True,
                  rope_base=1e6, norm_eps=1e-6),
    "qwen2.5": dict(dim=3584, n_head=28, n_local_heads=4, intermediate_size=18944, qkv_bias=True, rope_base=1e6,
                    norm_eps=1e-6),
    "llama-3.2": dict(dim=3072, n_head=24, n_local_heads=8, intermediate_size=8192, tie_embeddings=True,
                      rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("family,int8,per_channel,sparsity", [
    ("qwen3", False, False, 0.5), ("qwen3", True, True, 0.5), ("qwen3", False, True, 0.0),
    ("qwen2.5", False, False, 0.5), ("qwen2.5", True, True, 0.5), ("qwen2.5", False, False, 0.0),
    ("llama-3.2", False, False, 0.5), ("llama-3.2", False, False, 0.0)])
def test_persistent_decode_of_the_new_families_matches_stepped_and_per_layer(family, int8, per_channel, sparsity):
    """As above (bf16; each family also dense, where the per-layer path holds it), with Qwen3's q/k norms in the
    attention tiles, Qwen2.5's biases in the q/k/v epilogue, and Llama-3.2's scaled RoPE table."""
    model = persistent_model(torch.bfloat16, int8, per_channel, sparsity, block_size=64, **PERSISTENT_FAMILIES[family])
    check_persistent_against_stepped_and_per_layer(model, torch.bfloat16)


def test_both_engines_sparse_decode_match_the_masked_reference():
    """The per-layer step and the persistent launch (and that launch with the row loop's other form: 64 rows an
    iteration, products reduced once, 3 stages of software pipelining), each against the masked PyTorch reference
    (tests/test_sparse.py: dense weights, inputs masked by hooks), fp32, at Llama-3-8B's head layout and narrower
    widths (two layers), teacher-forced with fixed tokens over 8 steps. On this random model one activation on the
    other side of its threshold moves the logits far beyond any tolerance, so engines that add in different orders
    could disagree without a defect: each threshold is set in a gap of its inputs over these steps, near their median
    (gap_thresholds), with no input within 1e-4 of it (relative), far beyond fp32's summation-order differences. Then
    the logits must agree within 1e-4 of the largest."""
    import copy
    from generate import persistent_layers
    from sparse import set_thresholds, sparsify
    from tests.test_sparse import gap_thresholds, masked_reference
    dense = random_model_at_llama3_heads(2, 64, "cuda").eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, 2048, (1, 6), device="cuda", generator=gen)
    tokens = torch.randint(0, 2048, (8, 1, 1), device="cuda", generator=gen)
    table = torch.zeros(2, 7)
    ref = masked_reference(dense, table)  # its hooks read the table when they run
    gap_thresholds(ref, table, prompt, tokens, quantile=0.5, margin=1e-4)
    per_layer = sparsify(copy.deepcopy(dense))
    set_thresholds(per_layer, table)
    model = copy.deepcopy(per_layer)
    layers = persistent_layers(model)
    variants = {"persistent, 64 rows an iteration, 3 stages": layers.launched(block_rows=64, stages=3)}
    with torch.no_grad():
        for m in (ref, per_layer, model):
            m.setup_caches(1, 64, exact=True)
            m(prompt, torch.arange(6, device="cuda"))
        for step, token in enumerate(tokens):
            p = torch.tensor([6 + step], device="cuda", dtype=torch.int)
            want = ref(token, p)[0, -1].float()
            # every launch writes the same cache row; the default launch's, written last, is the one kept
            hs = {name: launch(token.int(), p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches,
                               model.v_caches) for name, launch in variants.items()}
            hs["persistent"] = layers(token.int(), p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches,
                                      model.v_caches)
            layers.check()  # a wait that gave up, before its numbers are blamed
            got = {"per-layer": per_layer(token, p)[0, -1].float(),
                   **{name: model.output(model.norm(h)[0])[0, -1].float() for name, h in hs.items()}}
            scale = float(want.abs().max())
            worst = {engine: float((logits - want).abs().max()) / scale for engine, logits in got.items()}
            assert max(worst.values()) <= 1e-4, f"step {step}, largest difference / largest logit: {worst}"


def check_persistent_against_stepped_and_per_layer(model, dtype):
    """At sparsity above 0, engines that add in different orders put an activation on the other side of its threshold
    now and then, and on these random models that one row moves the logits far beyond any tolerance (RESULTS.md,
    "First GPU run of the persistent engine"): the sparse arithmetic is held to the masked reference flip-free by
    test_both_engines_sparse_decode_match_the_masked_reference, and a sparse model here to its stepped mode only."""
    import copy
    from generate import persistent_layers
    ref = copy.deepcopy(model)
    layers = persistent_layers(model)
    stepped = layers.launched(stepped=True)
    dense = not any(t.any() for t in layers.thresholds)
    prompt = torch.randint(0, 2048, (1, 6), device="cuda")
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        ref(prompt, torch.arange(6, device="cuda"))
        model(prompt, torch.arange(6, device="cuda"))
        token = prompt[:, -1:].int()
        for pos in range(6, 30):
            p = torch.tensor([pos], device="cuda", dtype=torch.int)
            want = ref(token, p)[0, -1].float()
            caches = model.k_caches.clone(), model.v_caches.clone()
            h_stepped = stepped(token, p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
            model.k_caches.copy_(caches[0])
            model.v_caches.copy_(caches[1])
            h = layers(token, p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
            assert torch.equal(h, h_stepped), f"position {pos}"
            if dense:
                got = model.output(model.norm(h)[0])[0, -1].float()
                scale = float(want.abs().max())
                torch.testing.assert_close(got, want, rtol=0, atol=atol * scale)
                top2 = want.topk(2).values
                if top2[0] - top2[1] > 2 * atol * scale:
                    assert int(got.argmax()) == int(want.argmax()), f"position {pos}"
            token = want.argmax().view(1, 1).int()
    layers.check()


def test_persistent_decode_1000_steps_in_cuda_graphs_without_a_hang():
    """generate() with the persistent step compiled into CUDA graphs, 1000 tokens: no wait gave up, and the tokens are
    the stepped mode's compiled the same way (the layers give equal bits each step; the final norm and LM head must
    be the same compiled code too: an eager norm may round otherwise, and a near-tie would then flip a greedy token)."""
    import functools
    import time
    from generate import decode_one_token_persistent, generate, persistent_layers
    model = persistent_model(torch.bfloat16, sparsity=0.5)
    layers = persistent_layers(model)

    def compiled(launched):
        return torch.compile(functools.partial(decode_one_token_persistent, layers=launched), mode="reduce-overhead",
                             fullgraph=True)
    prompt = torch.randint(0, 2048, (5,), device="cuda", dtype=torch.int)
    start = time.perf_counter()
    got = generate(model, prompt, 1000, temperature=0, decode_fn=compiled(layers))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    layers.check()
    want = generate(model, prompt, 1000, temperature=0, decode_fn=compiled(layers.launched(stepped=True)))
    differ = (got != want).nonzero()
    assert differ.numel() == 0, f"generated token {int(differ[0, -1]) - prompt.numel()} of 1000 differs first"
    assert elapsed < 60, f"1000 steps took {elapsed:.1f} s"
    torch._dynamo.reset()


def test_persistent_grid_guard_refuses_more_programs_than_fit():
    from generate import persistent_layers
    model = persistent_model(torch.bfloat16, sparsity=0.0, n_layer=2, block_size=64)
    layers = persistent_layers(model, programs=1 << 20)
    token, pos = torch.zeros(1, 1, dtype=torch.int, device="cuda"), torch.tensor([3], device="cuda")
    with pytest.raises(ValueError, match="holds only"):
        layers(token, pos, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
    layers.programs = 0
    layers(token, pos, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
    layers.check()


def one_shot_worker(rank, world, port, result_dir):
    """Many consecutive fused all-reduce + residual add + RMSNorm calls on distinct inputs (both buffer slots, several
    sizes, 1-8 tokens), eager and replayed from a CUDA graph: the sum against the float64 sum of every rank's input
    and the residual, the norm against float64 math on the returned sum."""
    import os

    import torch.distributed as dist

    from tp import AllReduceRMSNorm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    shapes = [(1, 1, 8192), (1, 5, 4096), (1, 1, 1000), (8, 1, 8192)]  # 1000: not a whole number of 16-byte vectors
    g = torch.Generator(device="cuda").manual_seed(0)  # the same stream on every rank: rank r takes input r
    norms = {}  # two norms per size share one buffer, as a block's two norms do
    for dim in sorted({s[-1] for s in shapes}):
        for site in range(2):
            norms[dim, site] = AllReduceRMSNorm(dim, eps=1e-5).to("cuda", torch.bfloat16)
            norms[dim, site].weight.data = torch.rand(dim, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    inputs = [([torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(world)],
               torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) * 4) for s in shapes for _ in range(3)]
    mine = [xs[rank].clone() for xs, _ in inputs]
    residuals = [r.clone() for _, r in inputs]

    def check(results, scale):
        for i, ((normed, h), (xs, residual)) in enumerate(zip(results, inputs)):
            exact = torch.stack([(x * scale).double() for x in xs]).sum(0) + residual.double()
            # summed in fp32 and rounded once to bf16: within half a bf16 ulp (2^-8 relative) of the exact sum
            torch.testing.assert_close(h.double(), exact, rtol=2 ** -8, atol=1e-30)
            hd = h.double()
            unit = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).double()
            want = unit * norms[h.shape[-1], i % 2].weight.double()
            # h / rms rounded to bf16, where fp32 arithmetic may round to the neighbour of the float64 value (one ulp,
            # 2^-7 relative), times the weight and rounded again (half an ulp)
            torch.testing.assert_close(normed.double(), want, rtol=3 * 2 ** -8, atol=1e-30)

    def calls():
        return [norms[x.shape[-1], i % 2](x, r) for i, (x, r) in enumerate(zip(mine, residuals))]

    check(calls(), 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = calls()
    for replay in range(5):
        for x, (xs, _) in zip(mine, inputs):  # new inputs each replay: a stale slot would show
            x.copy_(xs[rank] * (replay + 2))
        graph.replay()
        torch.cuda.synchronize()
        check(captured, replay + 2)
    torch.save(len(inputs) * 6, f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs of one host (nvidia-h200-x2)")
def test_one_shot_all_reduce_rmsnorm_matches_float64_math(tmp_path):
    import socket

    import torch.multiprocessing as mp
    world = min(torch.cuda.device_count(), 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(one_shot_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)] == [72] * world
