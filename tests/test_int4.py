"""Group-wise quantized weights (4-bit RTN and GGUF Q4_0 / Q4_1 / Q8_0): quantization against a float64 reference,
the sparse GEMV under TRITON_INTERPRET against the dequantized weight's PyTorch product, GGUF repacking, quantized
token embeddings and LM heads, and the default model at its own Q4_1 (token embedding Q8_0)."""
import numpy as np
import pytest
import torch

from sparse import GroupQuant, QuantizedEmbedding, SparseLinear, quantize_groupwise, sparse_layers
from sparse_gemv import grouped, sparse_gemv, sparse_gemv_reference
from sparse_gemv.grouped import grouped_sparse_gemv_triton
from sparse_gemv.quant import dequantize_columns, dequantize_grouped, grouped_matmul, pack_int4, unpack_int4

# Relative Frobenius error of the kernels against the float64 product of the same dequantized weights: fp32
# accumulation; bf16 activations (and, with several tokens, the tensor-core product's bf16 operands) round to 8 bits.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
FORMATS = {"int4 zero points": GroupQuant(4, 32, True), "int4 symmetric": GroupQuant(4, 64, False),
           "int8 (Q8_0)": GroupQuant(8, 128, False)}


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def test_int4_packing_round_trips_and_keeps_rows_contiguous():
    q = torch.randint(0, 16, (5, 24), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 12) and packed.is_contiguous() and torch.equal(unpack_int4(packed), q)
    # column 2j in byte j's low nibble, 2j + 1 in its high nibble: a row's columns are that row's bytes alone
    assert int(packed[2, 3]) == int(q[2, 6]) + 16 * int(q[2, 7])


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits,zero_point", [(4, True), (4, False), (8, False)])
def test_quantize_dequantize_against_float64_reference(group_size, bits, zero_point):
    # K = 300 is no multiple of any group size: the last group is short. One channel is constant (range 0).
    g = torch.Generator().manual_seed(group_size + bits + zero_point)
    w = torch.randn(24, 300, generator=g) * torch.logspace(-2, 1, 24)[:, None]
    w[5] = 0.25
    quant = GroupQuant(bits, group_size, zero_point)
    q, scales, zeros = quantize_groupwise(w, quant)
    groups = -(-300 // group_size)
    assert scales.dtype == torch.float16 and scales.shape == (groups, 24)
    assert q.shape == ((300, 12) if bits == 4 else (300, 24)) and q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert (zeros is not None) == zero_point
    deq = dequantize_grouped(q, scales, zeros, group_size)  # [K, N] float32

    # float64 reference, group by group: the scale (and zero) from the group's range, rounded to fp16 as stored;
    # every weight rounded to the nearest of its group's levels.
    w64 = w.double().t()
    for gi in range(groups):
        rows = slice(gi * group_size, min((gi + 1) * group_size, 300))
        block = w64[rows]
        s = scales[gi].double()
        if zero_point:
            low, high = block.min(0).values, block.max(0).values
            expect_s = torch.where(high > low, (high - low) / 15, torch.ones_like(low))
            assert torch.allclose(zeros[gi].double(), low, rtol=2 ** -10, atol=1e-7)
            levels = torch.clamp(torch.round((block - zeros[gi].double()) / s), 0, 15)
            ref = levels * s + zeros[gi].double()
        else:
            top = 7 if bits == 4 else 127
            amax = block.abs().max(0).values
            expect_s = torch.where(amax > 0, amax / top, torch.ones_like(amax))
            levels = torch.clamp(torch.round(block / s), -8 if bits == 4 else -127, top)
            ref = levels * s
        assert torch.allclose(s, expect_s, rtol=2 ** -10, atol=0)  # fp16 rounding of the exact scale
        assert torch.allclose(deq[rows].double(), ref, rtol=1e-6, atol=1e-7)
        # round to nearest: within half a level of the weight (levels rounded to fp16 may cut a hair off the range)
        assert ((deq[rows].double() - block).abs() <= s / 2 * (1 + 2 ** -9) + 1e-7).all()
    if zero_point:
        assert (deq[:, 5] == 0.25).all()  # a constant channel is exact


def problem(fmt: str, tokens: int, dtype, seed: int = 0, k: int = 140):
    """x [tokens, K]; the quantized weight of a three-group layer (q/k/v-like, groups in whole words) and its
    float64 dequantization. K = 140 is no multiple of the group sizes."""
    quant = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    splits = [40, 8, 16]
    w = torch.randn(sum(splits), k, generator=g) / k ** 0.5
    q, scales, zeros = quantize_groupwise(w, quant)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    return x, q, scales, zeros, quant.group_size, splits, dequantize_grouped(q, scales, zeros, quant.group_size,
                                                                               torch.float64)


def thresholds_for(x, sparsity, groups, per_channel, seed=1):
    """Per-tensor thresholds at x's |x| quantile, or per-channel ones spread around it."""
    t = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0
    if not per_channel:
        return torch.full((groups,), t)
    g = torch.Generator().manual_seed(seed)
    return t * (0.5 + torch.rand(groups, x.shape[1], generator=g))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("tokens,dtype", [(1, torch.float32), (3, torch.float32), (8, torch.bfloat16)])
def test_grouped_kernel_matches_the_dequantized_product(fmt, tokens, dtype):
    # Both variants (predicated: a group's rows masked; compact: kept rows listed per group) at 0 / 0.5 / 0.9
    # sparsity, per-tensor thresholds at 0 and 0.9 and per-channel ones at 0.5; K split in two where it holds two
    # groups (under the interpreter), reduced in the kernel and returned as partial sums.
    x, q, scales, zeros, group_size, splits, w64 = problem(fmt, tokens, dtype)
    for sparsity in (0.0, 0.5, 0.9):
        thr = thresholds_for(x, sparsity, len(splits), per_channel=sparsity == 0.5)
        ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
        for compact in (False, True):
            y = grouped_sparse_gemv_triton(x, q, scales, zeros, group_size, thr, splits, compact)
            assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype], (sparsity, compact)
    parts = grouped_sparse_gemv_triton(x, q, scales, zeros, group_size, thr, splits, reduce=False)
    assert parts.shape[0] == (2 if x.shape[1] >= 2 * group_size else 1) and rel_err(parts.sum(0), ref) < TOL[dtype]
    # the op's CPU path (the reference, dequantizing on the fly) agrees
    assert rel_err(sparse_gemv(x, q, thr, splits, False, scales, zeros, group_size), ref) < TOL[dtype]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_grouped_kernel_one_token_tiles_of_several_slabs(fmt):
    # GPU-wide one-token strips: a tile is walked in several slabs of ROWS rows (the CPU default tiles take one),
    # predicated (the tile is a group) and compact (32 kept rows), K split in two; strips wider than the layer's
    # q/k/v groups leave most columns masked.
    x, q, scales, zeros, group_size, splits, w64 = problem(fmt, 1, torch.float32, k=300)
    words = 32 // (8 if fmt == "int8 (Q8_0)" else 4)
    thr = thresholds_for(x, 0.5, len(splits), per_channel=True)
    ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
    for compact, block_k in ((False, group_size), (True, 32)):
        config = {"BLOCK_N": 32 * words, "BLOCK_K": block_k, "SPLIT_K": 2, "COMPACT": compact, "STAGES": 1}
        assert grouped.tile_rows(32, block_k, 4) < block_k  # 32 words a row: 16 rows a slab
        y = grouped_sparse_gemv_triton(x, q, scales, zeros, group_size, thr, splits, compact, config=config)
        assert rel_err(y, ref) < TOL[torch.float32], compact


def test_grouped_tile_rule_takes_512_column_strips_where_the_h100_sweep_found_them_fastest():
    # One token, 4-bit weights in 128-row groups, on 132 SMs (the H100): 512 columns and one stage where every output
    # group is whole strips and the grid still gives every SM a program; other one-token tiles 256 columns and three
    # stages; several tokens their own narrower tiles.
    def pick(k, splits, compact=False, group_size=128, tokens=1, bits=4):
        c = grouped.pick_grouped_config(k, splits, compact, 132, group_size, tokens, bits)
        return c["BLOCK_N"], c["SPLIT_K"], c["STAGES"]
    assert pick(4096, (14336, 14336)) == (512, 8, 1)  # gate/up
    assert pick(14336, (4096,)) == (512, 32, 1)  # down
    assert pick(4096, (4096, 1024, 1024)) == (512, 16, 1)  # q/k/v: 12 strips x 16
    assert pick(4096, (4096,)) == (256, 16, 3)  # o: 8 strips x 16 would leave SMs idle
    assert pick(576, (576, 192, 192))[0] == 256  # groups that are not whole strips
    assert pick(4096, (14336, 14336), group_size=32)[0] == 256  # GGUF's 32-row blocks
    assert pick(4096, (14336, 14336), bits=8)[0] == 256
    assert pick(4096, (14336, 14336), compact=True)[::2] == (256, 3)
    assert pick(4096, (14336, 14336), tokens=4)[0] != 512


def test_grouped_kernel_at_the_rules_512_column_tile():
    # The GPU rule's one-token tile (512 columns, one stage, 16 slabs a group) run under the interpreter on a layer
    # of two 512-column groups, predicated, at 0 / 0.5 with per-channel thresholds at 0.5.
    quant = GroupQuant(4, 128, True)
    g = torch.Generator().manual_seed(3)
    splits, k = (512, 512), 256
    q, scales, zeros = quantize_groupwise(torch.randn(sum(splits), k, generator=g) / k ** 0.5, quant)
    w64 = dequantize_grouped(q, scales, zeros, 128, torch.float64)
    x = torch.randn(1, k, generator=g)
    config = grouped.pick_grouped_config(k, splits, False, 2, 128)
    assert (config["BLOCK_N"], config["STAGES"]) == (512, 1)
    for sparsity in (0.0, 0.5):
        thr = thresholds_for(x, sparsity, len(splits), per_channel=sparsity == 0.5)
        ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
        y = grouped_sparse_gemv_triton(x, q, scales, zeros, 128, thr, splits, False, config=config)
        assert rel_err(y, ref) < TOL[torch.float32], sparsity


def test_grouped_kernel_skips_the_rows_and_scales_of_dropped_inputs():
    # Rows under threshold are never loaded: poisoning their nibbles and every scale of groups with no kept row
    # (NaN) must leave the output unchanged.
    x, q, scales, zeros, group_size, splits, w64 = problem("int4 zero points", 1, torch.float32)
    x[:, 64:128] = 0.01  # groups 2 and 3 (of 32 rows) wholly under threshold
    thr = torch.full((3,), 0.5)
    dropped = (x.abs() <= 0.5)[0]
    q_bad, scales_bad, zeros_bad = q.clone(), scales.clone(), zeros.clone()
    q_bad[dropped] = 0xFF
    scales_bad[2:4], zeros_bad[2:4] = float("nan"), float("nan")
    ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
    for compact in (False, True):
        y = grouped_sparse_gemv_triton(x, q_bad, scales_bad, zeros_bad, group_size, thr, splits, compact)
        assert torch.isfinite(y).all() and rel_err(y, ref) < TOL[torch.float32]


def test_grouped_op_checks_its_inputs_and_compiles_on_cpu():
    x, q, scales, zeros, group_size, splits, w64 = problem("int4 zero points", 1, torch.float32)
    thr = torch.full((3,), 0.3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        sparse_gemv(x, q, thr, splits, False, scales, zeros, 48)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        sparse_gemv(x, q, thr, [36, 12, 16], False, scales, zeros, group_size)
    with pytest.raises(TypeError, match="fp16 scales"):
        sparse_gemv(x, q, thr, splits, False, scales.float(), zeros, group_size)
    with pytest.raises(TypeError, match="zeros go with group-wise"):
        sparse_gemv(x, q, thr, splits, False, None, zeros)
    ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
    args = (q, thr, splits, False, scales, zeros, group_size)
    f = torch.compile(lambda a: torch.ops.teal.sparse_gemv(a, *args), fullgraph=True)
    assert rel_err(f(x), ref) < TOL[torch.float32]
    torch.library.opcheck(torch.ops.teal.sparse_gemv.default, (x, *args))
    torch.library.opcheck(torch.ops.teal.sparse_gemv_partials.default, (x, *args))


def test_grouped_kernel_refuses_predicated_tiles_across_groups():
    # A predicated tile dequantizes with the scales of its first row's group: BLOCK_K must be the group size. A
    # compact tile stops at its group's last kept row, so any BLOCK_K is right there.
    x, q, scales, zeros, group_size, splits, w64 = problem("int4 zero points", 1, torch.float32, k=256)
    thr = thresholds_for(x, 0.5, len(splits), per_channel=False)
    ref = sparse_gemv_reference(x.double(), w64, thr.double(), splits)
    for block_k in (16, 64):
        config = {"BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 1, "COMPACT": False, "STAGES": 1}
        with pytest.raises(ValueError, match=f"BLOCK_K = group_size \\({group_size}\\), got BLOCK_K={block_k}"):
            grouped_sparse_gemv_triton(x, q, scales, zeros, group_size, thr, splits, config=config)
        config["COMPACT"] = True
        y = grouped_sparse_gemv_triton(x, q, scales, zeros, group_size, thr, splits, True, config=config)
        assert rel_err(y, ref) < TOL[torch.float32], block_k


def test_sparse_linear_with_int4_weights_decodes_as_it_prefills():
    # A layer quantized at load: its single-token steps (the sparse op) and its prefill (dequantized matmul) multiply
    # by the same weights, which are the layer's dequantized ones.
    linear = torch.nn.Linear(200, 96, bias=False)
    layer = SparseLinear.from_linear(linear, (64, 32), group_quant=GroupQuant(4, 64, True))
    assert layer.weight_t.shape == (200, 48) and layer.scales.shape == (4, 96) and not layer.int8
    assert layer.row_bytes(96) == 96 * (0.5 + 4 / 64)
    x = torch.randn(1, 5, 200)
    w = layer.dense_weight(torch.float64)
    assert (w - linear.weight.detach().double().t()).abs().max() <= layer.scales.double().max() / 2 * 1.01
    prefill = layer(x)
    steps = torch.cat([layer(x[:, i:i + 1]) for i in range(5)], dim=1)
    assert torch.allclose(prefill, steps, atol=1e-5) and torch.allclose(prefill.double(), x.double() @ w, atol=1e-5)


GGUF_TYPES = ["Q4_0", "Q4_1", "Q8_0"]


@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_tensors_repack_bit_exactly(kind, tmp_path):
    # Tensors quantized and written by the gguf package, read back, repacked: the repacked weight dequantizes to
    # exactly gguf's own dequantization, and its scales (and zeros) are the blocks' fp16 d (and m) bit for bit.
    import gguf
    from convert_hf_checkpoint import repack_gguf
    qtype = gguf.GGMLQuantizationType[kind]
    w = (np.random.default_rng(0).standard_normal((40, 96)) * 0.1).astype(np.float32)  # [N, K]
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("w", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert tensor.tensor_type == qtype
    weight_t, scales, zeros = repack_gguf(tensor.data, kind)
    expect = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype).copy())  # [N, K]
    assert torch.equal(dequantize_grouped(weight_t, scales, zeros, 32).t(), expect)
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = np.asarray(tensor.data).reshape(40, 3, size)
    assert np.array_equal(scales.t().contiguous().numpy().view(np.uint8).reshape(40, 3, 2), blocks[..., :2])
    assert (zeros is not None) == (kind == "Q4_1")
    if zeros is not None:
        assert np.array_equal(zeros.t().contiguous().numpy().view(np.uint8).reshape(40, 3, 2), blocks[..., 2:4])


def test_default_model_at_its_own_q4_1_gives_the_dequantized_models_greedy_tokens(default_checkpoint,
                                                                                   default_q4_1_checkpoint):
    # The default GGUF converted twice: dequantized to fp32 (the default checkpoint) and with its Q4_1 projections
    # repacked. Their weights are equal, and so are their greedy tokens dense (the quantized one runs its projections
    # and LM head through the fused CPU kernel, which reads the quantized codes). At 50% sparsity the two add in
    # different orders, and on this model one activation landing on the other side of its threshold (a difference of
    # 1e-6, as on some CPUs in layer 6's down projection) moves the logits of later steps by 20%: so there each
    # sparse layer of the Q4_1 model is held to the dequantized one's on the same inputs, the dequantized model's own
    # along its greedy decode, within 1e-5 of the largest output.
    from generate import generate, load_sparse_model
    from model import load_model
    from tokenizer import load_tokenizer
    quantized_checkpoint = default_q4_1_checkpoint
    quantized = load_model(quantized_checkpoint, dtype=torch.float32)
    dense = load_model(default_checkpoint, dtype=torch.float32)
    # 5x smaller: the Q4_1 projections and the Q8_0 token embedding, which is also the tied LM head, kept
    assert (quantized_checkpoint / "model.safetensors").stat().st_size * 5 < \
        (default_checkpoint / "model.safetensors").stat().st_size
    layer = quantized.layers[7].feed_forward.w13
    assert layer.group_quant == GroupQuant(4, 32, True)
    assert torch.equal(layer.dense_weight(torch.float32), dense.layers[7].feed_forward.w13.weight.detach().t())
    assert isinstance(quantized.tok_embeddings, QuantizedEmbedding)
    assert quantized.tok_embeddings.group_quant == quantized.output.group_quant == GroupQuant(8, 32, False)
    assert quantized.output.weight_t is quantized.tok_embeddings.weight_t  # one table
    assert torch.equal(quantized.output.dense_weight(torch.float32).t(), dense.tok_embeddings.weight.detach())
    tok = load_tokenizer(default_checkpoint)
    prompt = torch.tensor(tok.encode("The capital of France is"), dtype=torch.int)
    a, _ = load_sparse_model(default_checkpoint, "cpu", torch.float32, 0.0, "greedy", None)
    b, _ = load_sparse_model(quantized_checkpoint, "cpu", torch.float32, 0.0, "greedy", None)
    new = [generate(m, prompt, 8, temperature=0)[0, prompt.numel():].tolist() for m in (a, b)]
    assert new[0] == new[1], new
    a, _ = load_sparse_model(default_checkpoint, "cpu", torch.float32, 0.5, "greedy", None)
    b, _ = load_sparse_model(quantized_checkpoint, "cpu", torch.float32, 0.5, "greedy", None)
    inputs = []  # (layer of a, layer of b, one decode step's input)
    hooks = [la.register_forward_pre_hook(lambda m, args, la=la, lb=lb: inputs.append((la, lb, args[0].clone()))
                                          if args[0].shape[1] == 1 else None)
             for (_, _, la), (_, _, lb) in zip(sparse_layers(a), sparse_layers(b))]
    generate(a, prompt, 8, temperature=0)
    for h in hooks:
        h.remove()
    assert len(inputs) == 7 * 4 * len(a.layers)  # every sparse layer of the 7 decode steps after the first token
    dropped = 0
    with torch.no_grad():
        for la, lb, x in inputs:
            want = la(x)
            torch.testing.assert_close(lb(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))
            dropped += int((x.abs() <= la.thresholds.min()).sum())
    assert dropped > 0.3 * sum(x.numel() for _, _, x in inputs)  # sparse indeed
    with pytest.raises(SystemExit, match="stores its projections quantized already"):
        load_sparse_model(quantized_checkpoint, "cpu", torch.float32, 0.5, "greedy", None,
                          group_quant=GroupQuant())


@pytest.mark.parametrize("name,bad", [("weight_t", lambda t: t.float()), ("weight_t", lambda t: t[:-1]),
                                      ("scales", lambda t: t.float()), ("zeros", lambda t: t[:, :-1])])
def test_quantized_checkpoint_with_a_misshapen_tensor_is_refused_at_load(tmp_path, name, bad):
    from safetensors.torch import save_file

    from model import ModelArgs, Transformer, load_model
    from sparse import sparsify
    args = ModelArgs(vocab_size=96, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, block_size=64)
    torch.manual_seed(0)
    model = sparsify(Transformer(args).eval(), group_quant=GroupQuant(4, 32, True))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("thresholds")}
    (tmp_path / "model_config.json").write_text(args.to_json())
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"group_size": "32"})
    loaded = load_model(tmp_path, dtype=torch.float32)  # the well-formed file loads, with its weights as they are
    assert torch.equal(loaded.layers[1].attention.wo.weight_t, model.layers[1].attention.wo.weight_t)
    key = f"layers.1.attention.wo.{name}"
    state[key] = bad(state[key]).contiguous()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"group_size": "32"})
    with pytest.raises(ValueError, match=rf"{key} is torch\.\w+[ ;]"):  # names the tensor and what it is
        load_model(tmp_path, dtype=torch.float32)


# Quantized tables: an embedding lookup dequantizes the rows it returns, an LM head multiplies by the whole table (the
# grouped kernel on a GPU, quant.grouped_matmul on the CPU). Relative error of either product against the float64
# product of the same dequantized weights: fp32 products and sums.
HEAD_TOL = 1e-5


@pytest.mark.parametrize("quant", [GroupQuant(8, 32, False), GroupQuant(4, 32, True), GroupQuant(4, 32, False)],
                         ids=["Q8_0", "Q4_1", "Q4_0"])
def test_quantized_table_lookup_and_head_against_the_dequantized_table(quant):
    # A [vocab, dim] table quantized in the head's layout ([dim, vocab], groups along dim; dim 200 ends in a short
    # group). The lookup is the dequantized table's rows bit for bit; the head's product, on the CPU and through the
    # grouped kernel (under the interpreter, threshold 0: dense), is the dequantized table's within HEAD_TOL.
    g = torch.Generator().manual_seed(quant.bits + quant.zero_point)
    table = torch.randn(96, 200, generator=g) * 0.1
    weight_t, scales, zeros = quantize_groupwise(table, quant)
    dequantized = dequantize_grouped(weight_t, scales, zeros, 32)  # [dim, vocab]
    embedding = QuantizedEmbedding(96, 200, quant, torch.float32)
    embedding.weight_t.data, embedding.scales.data = weight_t, scales
    if zeros is not None:
        embedding.zeros.data = zeros
    idx = torch.tensor([[0, 95, 7, 7], [1, 2, 50, 51]])
    assert torch.equal(embedding(idx), dequantized.t()[idx])
    assert embedding(idx[:, :1]).dtype == torch.float32
    assert torch.equal(dequantize_columns(weight_t, scales, zeros, 32, idx.view(-1), torch.bfloat16),
                       dequantized.t()[idx.view(-1)].bfloat16())
    head = SparseLinear(200, 96, (96,), group_quant=quant)
    head.weight_t.data, head.scales.data = weight_t, scales
    if zeros is not None:
        head.zeros.data = zeros
    for tokens in (1, 12):  # a decode step (the op's CPU path) and a prefill (the layer's dense product)
        x = torch.randn(1, tokens, 200, generator=g)
        ref = x.double() @ dequantized.double()
        assert rel_err(head(x), ref) < HEAD_TOL
        assert rel_err(grouped_matmul(x, weight_t, scales, zeros, 32), ref) < HEAD_TOL
    x = torch.randn(1, 200, generator=g)
    y = grouped_sparse_gemv_triton(x, weight_t, scales, zeros, 32, torch.zeros(1), (96,))
    assert rel_err(y, x.double() @ dequantized.double()) < HEAD_TOL


def quantized_gguf(path, head: str | None, dim: int = 64, hidden: int = 96, layers: int = 2):
    """A tiny llama GGUF quantized as the default model is (projections Q4_1, token embedding Q8_0), with a byte-level
    BPE vocabulary of 264 tokens (whole int32 words of 4-bit columns); head: the type of an untied output.weight, or
    None for tied embeddings."""
    import gguf
    from tokenizers import pre_tokenizers
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["th"] + [f"<pad{i}>" for i in range(5)]
    tokens += ["<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, layers), (w.add_context_length, 64), (w.add_embedding_length, dim),
                       (w.add_feed_forward_length, hidden), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"), (w.add_token_list, tokens),
                       (w.add_token_types, [1] * (len(tokens) - 2) + [3, 3]), (w.add_token_merges, ["t h"]),
                       (w.add_bos_token_id, len(tokens) - 2), (w.add_eos_token_id, len(tokens) - 1)):
        add(value)
    rng = np.random.default_rng(0)

    def add(name, shape, kind="Q4_1"):
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        qtype = gguf.GGMLQuantizationType[kind]
        data = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    add("token_embd.weight", (len(tokens), dim), "Q8_0")
    add("output_norm.weight", (dim,))
    if head is not None:
        add("output.weight", (len(tokens), dim), head)
    for i in range(layers):
        b = f"blk.{i}."
        for name, shape in (("attn_q", (dim, dim)), ("attn_k", (dim // 2, dim)), ("attn_v", (dim // 2, dim)),
                            ("attn_output", (dim, dim)), ("ffn_gate", (hidden, dim)), ("ffn_up", (hidden, dim)),
                            ("ffn_down", (dim, hidden))):
            add(f"{b}{name}.weight", shape)
        add(b + "attn_norm.weight", (dim,))
        add(b + "ffn_norm.weight", (dim,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("head", [None, "Q8_0", "Q4_1", "Q4_0"], ids=["tied", "Q8_0", "Q4_1", "Q4_0"])
def test_gguf_embedding_and_head_keep_their_quantization(tmp_path, head):
    # A GGUF converted twice, with --keep_quantization and without (dequantized, fp32). The kept token embedding is
    # the file's Q8_0 blocks bit for bit; its lookups are the dequantized table's rows exactly; the head (the same
    # tensors when tied) multiplies as the dequantized one within HEAD_TOL; and both models give the same greedy
    # tokens, the quantized one through the per-layer and the persistent (stepped) engines.
    import gguf
    from safetensors.torch import load_file

    from convert_hf_checkpoint import convert_gguf
    from generate import decode_step, generate
    from model import load_model
    path = quantized_gguf(tmp_path / "m.gguf", head)
    kept = convert_gguf(path, tmp_path / "kept", keep_quantization=True)
    dense = load_model(convert_gguf(path, tmp_path / "dense"), dtype=torch.float32)
    state = load_file(kept / "model.safetensors")
    assert "tok_embeddings.weight" not in state and "output.weight" not in state
    assert ("output.weight_t" in state) == (head is not None)
    blocks = np.asarray(next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight").data)
    blocks = blocks.reshape(264, 2, 34)  # [vocab, dim / 32 blocks, fp16 d and 32 int8]
    assert np.array_equal(state["tok_embeddings.scales"].t().contiguous().numpy().view(np.uint8).reshape(264, 2, 2),
                          blocks[..., :2])
    assert np.array_equal(state["tok_embeddings.weight_t"].t().contiguous().numpy().view(np.uint8).reshape(264, 2, 32),
                          blocks[..., 2:])
    model = load_model(kept, dtype=torch.float32)
    assert isinstance(model.tok_embeddings, QuantizedEmbedding) and isinstance(model.output, SparseLinear)
    assert (model.output.weight_t is model.tok_embeddings.weight_t) == (head is None)
    if head is not None:
        assert model.output.group_quant == GroupQuant(8 if head == "Q8_0" else 4, 32, head == "Q4_1")
    ids = torch.arange(264).view(2, -1)
    assert torch.equal(model.tok_embeddings(ids), dense.tok_embeddings.weight.detach()[ids])
    x = torch.randn(1, 3, 64)
    assert rel_err(model.output(x), x.double() @ dense.output.weight.detach().double().t()) < HEAD_TOL
    prompt = torch.tensor([5, 17, 42, 7], dtype=torch.int)
    want = generate(dense, prompt, 6, temperature=0)
    assert torch.equal(generate(model, prompt, 6, temperature=0), want)
    step, _ = decode_step(model, "persistent-stepped")
    assert torch.equal(generate(model, prompt, 3, temperature=0, decode_fn=step), want[:, :prompt.numel() + 3])
