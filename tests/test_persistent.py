"""The persistent decode kernel (sparse_gemv/persistent.py) in stepped mode, on the CPU under the Triton interpreter,
against the per-layer path, whose CPU ops are the PyTorch references (masked matmuls, attention by
scaled_dot_product_attention). Tiny random models: two layers each, so the hand-off from one layer's down projection
to the next layer's attention norm is exercised; a Llama-like one with grouped-query attention and a Mistral-like one
with a single KV head, a head size that is not dim / n_head, an intermediate size of 3 x 32 and tied embeddings; for
group-wise quantized weights also one whose widths (160, 192) hold several groups of 128 rows and a short last one;
and the new families' tiny models (tests/test_families.py): Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, head size
24 at 64 wide and 4 heads) and Llama-3.2 (tied embeddings, Llama-3 RoPE scaling), every parameter random."""
import copy
import math

import pytest
import torch

from generate import check_engine, decode_step, generate, persistent_layers
from model import ModelArgs, Transformer
from sparse import LAYER_GROUPS, GroupQuant, sparse_layers, sparsify
from sparse_gemv.persistent import decode_layers
from tests.test_families import tiny_family_model

CONFIGS = {
    "llama": dict(vocab_size=96, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                  rope_base=500000.0),
    "mistral": dict(vocab_size=80, n_layer=2, n_head=2, n_local_heads=1, head_dim=32, dim=64, intermediate_size=96,
                    tie_embeddings=True),
    "groups": dict(vocab_size=64, n_layer=2, n_head=2, n_local_heads=1, head_dim=64, dim=160, intermediate_size=192),
}
PROMPT = torch.tensor([3, 17, 42, 7], dtype=torch.int)


def tiny_dense_model(name: str, dtype, seed: int = 0) -> Transformer:
    args = ModelArgs(block_size=128, name=name, **CONFIGS[name])
    torch.manual_seed(seed)
    model = Transformer(args)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def tiny_model(name: str, dtype, int8: bool = False, per_channel: bool = False, seed: int = 0,
               group_quant: GroupQuant | None = None) -> Transformer:
    model = sparsify(tiny_dense_model(name, dtype, seed), per_channel=per_channel, int8=int8, group_quant=group_quant)
    model.setup_caches(1, 96)
    return model


@torch.no_grad()
def calibrate(model: Transformer, sparsity: float) -> None:
    """Thresholds at the `sparsity` quantile of each projection's |input| over a random prefill (per channel: of each
    input channel's)."""
    if sparsity == 0:
        return
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, key=(i, path): inputs.__setitem__(key, a[0]))
             for i, path, layer in sparse_layers(model)]
    gen = torch.Generator().manual_seed(1)
    model(torch.randint(0, model.config.vocab_size, (1, 48), generator=gen), torch.arange(48))
    for h in hooks:
        h.remove()
    for i, path, layer in sparse_layers(model):
        x = inputs[(i, path)].reshape(-1, layer.in_features).abs().float()
        for g in range(len(LAYER_GROUPS[path])):
            q = torch.quantile(x, sparsity, dim=0) if layer.per_channel else torch.quantile(x, sparsity)
            layer.thresholds[g].copy_(q * (1 + 0.1 * g))  # q, k and v (gate and up) a little apart


@torch.no_grad()
def compare_decode(ref: Transformer, model: Transformer, layers, steps: int, atol: float, prompt=PROMPT):
    """Teacher-forced decode of both from the same prefill: each step's logits equal within atol (relative to the
    largest |logit|), and the greedy tokens identical. Returns the largest relative difference."""
    pos = torch.arange(prompt.numel())
    first = ref(prompt.view(1, -1), pos)[:, -1].argmax(-1)
    model(prompt.view(1, -1), pos)  # the per-layer prefill fills the persistent model's caches
    token, worst = first.view(1, 1).int(), 0.0
    for step in range(steps):
        p = torch.tensor([prompt.numel() + step], dtype=torch.int)
        want = ref(token, p)[0, -1].float()
        h = layers(token, p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
        got = model.output(model.norm(h)[0])[0, -1].float()
        scale = want.abs().max()
        worst = max(worst, float((got - want).abs().max() / scale))
        torch.testing.assert_close(got, want, rtol=0, atol=atol * float(scale), msg=f"step {step}")
        top2 = want.topk(2).values
        if top2[0] - top2[1] > 2 * atol * scale:  # a tie within the tolerance may go either way
            assert int(got.argmax()) == int(want.argmax()), f"greedy token differs at step {step}"
        token = want.argmax().view(1, 1).int()
    layers.check()
    return worst


# dtype -> logits tolerance relative to the largest |logit|. fp32 differs by summation order only. bf16: Triton's
# interpreter (3.9) converts fp32 to bf16 by truncation, not rounding to nearest, so every projection, norm and stream
# value the kernel rounds may be one bf16 step off the reference's; checked at sparsity 0 only, since at the others an
# activation truncated across its threshold drops or keeps a weight row the reference does not (the sparse arithmetic
# is held to the reference in fp32 here, and flip-free on the GPU in tests/test_gpu.py).
ATOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("name,dtype,int8,per_channel,sparsities", [
    ("llama", torch.float32, False, False, (0.0, 0.5, 0.9)),
    ("llama", torch.float32, True, True, (0.5, 0.9)),
    ("llama", torch.bfloat16, False, True, (0.0,)),
    ("mistral", torch.float32, False, True, (0.0, 0.9)),
    ("mistral", torch.float32, True, False, (0.5,)),
    ("mistral", torch.bfloat16, True, False, (0.0,)),
])
def test_stepped_logits_match_the_per_layer_path(name, dtype, int8, per_channel, sparsities):
    """One set of stacked tensors for every sparsity: a new sparsity is a copy into the layers' thresholds."""
    check_sparsities(tiny_model(name, dtype, int8, per_channel), sparsities, ATOL[dtype])


def check_sparsities(model: Transformer, sparsities, atol: float, **tuning) -> None:
    ref = copy.deepcopy(model)
    layers = persistent_layers(model, stepped=True, **tuning)
    for s in sparsities:
        calibrate(ref, s)
        for (_, _, a), (_, _, b) in zip(sparse_layers(ref), sparse_layers(model)):
            b.thresholds.copy_(a.thresholds)
        compare_decode(ref, model, layers, steps=2, atol=atol)


# block_rows 16: four row iterations a tile, products kept per row and reduced once; 128: one iteration past the
# layers' 64 rows (masked), as the default 256 takes: bf16 and fp32 products reduced as they go, int8 ones folded into
# one load pass's rows (two or four rows into one here). bf16 weights (read as int32 pairs), int8 (quads) and fp32
# (plain) in both forms, per-tensor and per-channel thresholds.
@pytest.mark.parametrize("name,dtype,int8,per_channel,block_rows,sparsities", [
    ("llama", torch.float32, False, False, 16, (0.0, 0.5)),
    ("llama", torch.bfloat16, False, False, 16, (0.0,)),
    ("mistral", torch.float32, True, False, 16, (0.0, 0.5)),
    ("llama", torch.float32, False, True, 128, (0.0, 0.5, 0.9)),
    ("mistral", torch.float32, True, False, 128, (0.0, 0.5)),
    ("llama", torch.bfloat16, False, False, 128, (0.0,)),
])
def test_stepped_row_blocks_match_the_per_layer_path(name, dtype, int8, per_channel, block_rows, sparsities):
    model = tiny_model(name, dtype, int8, per_channel)
    check_sparsities(model, sparsities, ATOL[dtype], block_rows=block_rows)


# 64 teacher-forced steps of the stepped launch, against the per-layer path and the masked PyTorch reference, on the
# Llama-like model (grouped-query attention) and the Mistral-like one (one KV head, tied embeddings) at 0.5. Over so
# many steps two summation orders would put some input on the other side of its threshold, which on these random
# models moves the logits past any tolerance: each threshold sits in a gap of its inputs over these steps, with none
# within 1e-4 of it (relative; gap_thresholds), so only a defect can fail the fp32 tolerance or the greedy tokens.
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_64_steps_match_the_per_layer_path_and_the_masked_reference(name):
    from sparse import set_thresholds
    from tests.test_sparse import gap_thresholds, masked_reference
    dense = tiny_dense_model(name, torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, dense.config.vocab_size, (1, 4), generator=gen)
    tokens = torch.randint(0, dense.config.vocab_size, (64, 1, 1), generator=gen)
    table = torch.zeros(dense.config.n_layer, 7)
    ref = masked_reference(dense, table)  # its hooks read the table when they run
    gap_thresholds(ref, table, prompt, tokens, quantile=0.5, margin=1e-4)
    per_layer = sparsify(copy.deepcopy(dense))
    set_thresholds(per_layer, table)
    model = copy.deepcopy(per_layer)
    layers = persistent_layers(model, stepped=True)
    atol = ATOL[torch.float32]
    with torch.no_grad():
        for m in (ref, per_layer, model):
            m.setup_caches(1, 96, exact=True)
            m(prompt, torch.arange(4))
        for step, token in enumerate(tokens):
            p = torch.tensor([4 + step], dtype=torch.int)
            want = ref(token, p)[0, -1]
            h = layers(token.int(), p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
            got = {"per-layer": per_layer(token, p)[0, -1], "persistent": model.output(model.norm(h)[0])[0, -1]}
            scale = float(want.abs().max())
            top2 = want.topk(2).values
            for engine, logits in got.items():
                assert float((logits - want).abs().max()) <= atol * scale, f"{engine}, step {step}"
                if top2[0] - top2[1] > 2 * atol * scale:
                    assert int(logits.argmax()) == int(want.argmax()), f"{engine}: greedy token, step {step}"
    layers.check()


def family_model(family: str, dtype, int8: bool = False, per_channel: bool = False) -> Transformer:
    model = sparsify(tiny_family_model(family).to(dtype), per_channel=per_channel, int8=int8)
    model.setup_caches(1, 96)
    return model


# Every family with fp32 and int8 weights, uniform and per-channel thresholds, at 0 / 0.5 / 0.9: the bias added in the
# qkv strips' epilogue, the q/k norms in the attention tile (the padded pairs of a head of 24 masked), the scaled RoPE
# table read as data; bf16 at sparsity 0 for the norms' roundings (see ATOL).
@pytest.mark.parametrize("family,dtype,int8,per_channel,sparsities", [
    ("qwen2", torch.float32, False, False, (0.0, 0.5, 0.9)),
    ("qwen2", torch.float32, True, True, (0.0, 0.5, 0.9)),
    ("qwen3", torch.float32, False, True, (0.0, 0.5, 0.9)),
    ("qwen3", torch.float32, True, False, (0.0, 0.5, 0.9)),
    ("qwen3", torch.bfloat16, False, False, (0.0,)),
    ("llama", torch.float32, False, False, (0.0, 0.5, 0.9)),
    ("llama", torch.float32, True, True, (0.0, 0.5, 0.9)),
])
def test_families_stepped_logits_match_the_per_layer_path(family, dtype, int8, per_channel, sparsities):
    check_sparsities(family_model(family, dtype, int8, per_channel), sparsities, ATOL[dtype])


# Qwen3's q/k norms are the new device code, so it decodes longest; the logit checks above cover the other paths.
@pytest.mark.parametrize("family,steps", [("qwen2", 8), ("qwen3", 24), ("llama", 8)])
def test_families_greedy_tokens_identical_over_many_steps(family, steps):
    model = family_model(family, torch.float32)
    calibrate(model, 0.5)
    ref = copy.deepcopy(model)
    layers = persistent_layers(model, stepped=True)
    assert compare_decode(ref, model, layers, steps=steps, atol=ATOL[torch.float32]) > 0


def test_qwen3_logits_match_transformers(tmp_path):
    """A transformers Qwen3ForCausalLM (random q/k norm weights, head_dim 24), converted, decoded densely through the
    persistent kernel after the model's own prefill: each step's logits within 1e-4 of transformers' on the whole
    sequence (float32), as assert_logits_match_hf holds the per-layer path."""
    from convert_hf_checkpoint import convert_hf_folder
    from model import load_model
    from tests.test_families import VOCAB, tiny_hf
    hf, folder = tiny_hf(tmp_path, "qwen3")
    model = sparsify(load_model(convert_hf_folder(folder, tmp_path / "converted", "float32"), dtype=torch.float32))
    model.setup_caches(1, 64)
    layers = persistent_layers(model, stepped=True)
    idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits[0]
        model(idx[:, :4], torch.arange(4))
        for pos in range(4, 12):
            p = torch.tensor([pos], dtype=torch.int)
            h = layers(idx[:, pos:pos + 1].int(), p, model.freqs_cis, model.tok_embeddings.weight, model.k_caches,
                       model.v_caches)
            assert (model.output(model.norm(h)[0])[0, -1] - want[pos]).abs().max() <= 1e-4, f"position {pos}"
    layers.check()


def test_greedy_tokens_identical_as_the_cache_crosses_an_attention_block():
    """Under the interpreter the attention tile reads the cache 64 positions at a time (launch's BLOCK_S): a 58-token
    prompt and 10 steps decode positions 58 to 67, the last four with a second block (the prefill writes positions
    0-57, the kernel the rest)."""
    model = tiny_model("mistral", torch.float32)
    calibrate(model, 0.5)
    ref = copy.deepcopy(model)
    layers = persistent_layers(model, stepped=True)
    prompt = torch.randint(0, model.config.vocab_size, (58,), generator=torch.Generator().manual_seed(2)).int()
    assert compare_decode(ref, model, layers, steps=10, atol=ATOL[torch.float32],
                          prompt=prompt) > 0  # not the same code path


# Group-wise quantized weights (sparse_gemv/grouped.py's layouts): 4-bit in groups of 32 and 128, with zero points
# (GGUF Q4_1's kind) and without (Q4_0's), and 8-bit in groups of 32 (Q8_0), at 0 / 0.5 / 0.9 with uniform and
# per-channel thresholds. The per-layer path on the CPU multiplies by the dequantized weight (the op's reference), the
# persistent tiles dequantize in registers group by group: fp32 products in another order, within ATOL. A tile walks
# a group in slabs of as many rows as its threads load 16 bytes of at once: with 4 warps the tiny strips take a group
# in one slab, with 1 warp in several (a 128-row group of a 64-column 4-bit strip in 8 slabs of 16 rows, the short
# group at K = 160 in slabs past its end). One step each: the interpreter runs every group's eight nibble fields as
# numpy calls, and the steps after the first are decode_layers' cache reads, which the greedy tests below cover.
@pytest.mark.parametrize("name,quant,per_channel,sparsities,warps", [
    ("mistral", GroupQuant(4, 32, True), False, (0.0, 0.5, 0.9), 1),
    ("mistral", GroupQuant(4, 32, False), True, (0.0, 0.5, 0.9), 4),
    ("groups", GroupQuant(4, 128, True), True, (0.0, 0.5, 0.9), 4),
    ("groups", GroupQuant(4, 128, False), False, (0.5,), 1),
    ("groups", GroupQuant(8, 32, False), False, (0.5,), 1),
    ("llama", GroupQuant(8, 32, False), True, (0.0, 0.9), 4),
])
def test_stepped_grouped_weights_match_the_per_layer_path(name, quant, per_channel, sparsities, warps):
    model = tiny_model(name, torch.float32, per_channel=per_channel, group_quant=quant)
    ref = copy.deepcopy(model)
    layers = persistent_layers(model, stepped=True, num_warps=warps)
    assert layers.group_size == quant.group_size and len(layers.zeros) == (4 if quant.zero_point else 0)
    for s in sparsities:
        calibrate(ref, s)
        for (_, _, a), (_, _, b) in zip(sparse_layers(ref), sparse_layers(model)):
            b.thresholds.copy_(a.thresholds)
        compare_decode(ref, model, layers, steps=1, atol=ATOL[torch.float32])


def test_grouped_weights_with_bf16_activations_at_sparsity_0():
    """bf16 activations with 4-bit weights (the GPU's --int4): the dequantized fp32 weights times bf16 inputs, rounded
    where the model rounds; within the interpreter's bf16 tolerance (ATOL's comment)."""
    model = tiny_model("mistral", torch.bfloat16, group_quant=GroupQuant(4, 32, True))
    compare_decode(copy.deepcopy(model), model, persistent_layers(model, stepped=True), steps=2,
                   atol=ATOL[torch.bfloat16])


def test_grouped_weights_give_the_per_layer_greedy_tokens_over_8_steps():
    model = tiny_model("mistral", torch.float32, group_quant=GroupQuant(4, 32, True))
    calibrate(model, 0.5)
    ref = copy.deepcopy(model)
    layers = persistent_layers(model, stepped=True)
    assert compare_decode(ref, model, layers, steps=8, atol=ATOL[torch.float32]) > 0


def test_default_model_at_its_own_q4_1_gives_the_per_layer_greedy_tokens(default_q4_1_checkpoint):
    """SmolLM2-135M-Instruct from its GGUF's own Q4_1 weights (4-bit, groups of 32, zero points; convert
    --keep_quantization) and Q8_0 token embedding, also its tied LM head, at 50% greedy sparsity: the persistent
    engine's stepped mode and the per-layer engine give the greedy tokens of the same model with the embedding and
    head dequantized to fp32 (nn.Embedding, nn.Linear). The interpreter runs every tile of every layer one after
    another (at these shapes, dim 576, 9 query and 3 KV heads of 64, intermediate 1536, thousands of 32-row group
    tiles a layer), so the model keeps its first layer and the persistent step decodes one token after the
    prefill's."""
    from generate import load_sparse_model
    from sparse import QuantizedEmbedding
    from tokenizer import load_tokenizer
    model, _ = load_sparse_model(default_q4_1_checkpoint, "cpu", torch.float32, 0.5, "greedy", None)
    del model.layers[1:]
    assert model.layers[0].feed_forward.w13.group_quant == GroupQuant(4, 32, True)
    assert isinstance(model.tok_embeddings, QuantizedEmbedding) and model.output.group_quant == GroupQuant(8, 32, False)
    prompt = torch.tensor(load_tokenizer(default_q4_1_checkpoint).encode("The capital of France is"), dtype=torch.int)
    fp32_table = copy.deepcopy(model)
    fp32_table.tok_embeddings = torch.nn.Embedding.from_pretrained(model.output.dense_weight(torch.float32).t())
    fp32_table.output = torch.nn.Linear(576, 49152, bias=False)
    fp32_table.output.weight = fp32_table.tok_embeddings.weight
    want = generate(fp32_table, prompt, 2, temperature=0)
    assert torch.equal(generate(copy.deepcopy(model), prompt, 2, temperature=0), want)
    step, layers = decode_step(model, "persistent-stepped")
    assert layers.group_size == 32 and layers.weights[2].dtype == torch.uint8 and len(layers.zeros) == 4
    assert torch.equal(generate(model, prompt, 2, temperature=0, decode_fn=step), want)


def test_generate_runs_through_the_compiled_persistent_step_and_stacks_without_copies():
    """generate() with decode_step's persistent function, compiled whole (fullgraph: the op traces through its fake
    implementation, its cache writes declared), gives the per-layer greedy tokens; the layers' tensors are views of
    the stacked ones (one copy in memory), including the caches."""
    model = tiny_model("mistral", torch.float32)
    calibrate(model, 0.5)
    want = generate(copy.deepcopy(model), PROMPT, 5, temperature=0)
    step, layers = decode_step(model, "persistent-stepped")
    got = generate(model, PROMPT, 5, temperature=0, decode_fn=torch.compile(step, backend="aot_eager", fullgraph=True))
    assert torch.equal(got, want)
    block = model.layers[1]
    assert block.feed_forward.w2.weight_t.data_ptr() == layers.weights[3][1].data_ptr()
    assert block.attention.wqkv.thresholds.data_ptr() == layers.thresholds[0][1].data_ptr()
    assert block.ffn_norm.weight.data_ptr() == layers.norm_weights[1, 1].data_ptr()
    assert block.attention.kv_cache.k_cache.data_ptr() == model.k_caches[1].data_ptr()
    # every layer's weights and thresholds start on a 16-byte boundary (q/k/v's 3 fp32 thresholds a layer are padded
    # to 4): the per-layer path's compiled step would otherwise copy the misaligned ones every step
    for i, path, layer in sparse_layers(model):
        for name in ("weight_t", "thresholds"):
            assert getattr(layer, name).data_ptr() % 16 == 0, (i, path, name)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("stepped", [True, False], ids=["stepped", "one-program-loop"])
@torch.no_grad()
def test_thresholds_at_any_layer_stride_give_the_same_step(per_channel, stepped):
    """The op reads each projection's thresholds at their own layer stride, in both of its modes (the persistent loop
    as one program is the interpreter's only way to run it): the padded stacks of persistent_layers and contiguous
    copies of them (layer strides 3, 1, 2, 1, or K times those per channel) give the same residual stream and cache
    writes, bit for bit."""
    model = tiny_model("llama", torch.float32, per_channel=per_channel)
    calibrate(model, 0.5)
    layers = persistent_layers(model, stepped=True)
    model(PROMPT.view(1, -1), torch.arange(PROMPT.numel()))
    outs = []
    for thresholds in (layers.thresholds, [t.contiguous() for t in layers.thresholds]):
        k, v = model.k_caches.clone(), model.v_caches.clone()
        out = decode_layers(torch.tensor([[5]], dtype=torch.int), torch.tensor([PROMPT.numel()]), model.freqs_cis,
                            model.tok_embeddings.weight, layers.norm_weights, layers.weights, thresholds, layers.scales,
                            layers.zeros, layers.group_size, k, v, layers.errors, None, model.config.norm_eps,
                            0 if stepped else 1, stepped)
        outs.append((out, k, v))
    if not per_channel:
        assert [t.stride(0) for t in layers.thresholds] == [4, 4, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert not layers.errors.any()


def test_dense_model_is_made_sparse_with_zero_thresholds():
    model = tiny_model("llama", torch.float32)  # sparsify'd with thresholds 0
    dense = copy.deepcopy(model)
    with torch.no_grad():  # the same weights as plain linears: undo sparsify on the copy
        for block, sparse_block in zip(dense.layers, model.layers):
            for path in LAYER_GROUPS:
                owner, attr = path.split(".")
                layer = getattr(getattr(sparse_block, owner), attr)
                linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
                linear.weight.copy_(layer.weight_t.t())
                setattr(getattr(block, owner), attr, linear)
    step, layers = decode_step(dense, "persistent-stepped")
    assert sum(1 for _ in sparse_layers(dense)) == 4 * dense.config.n_layer
    assert all(float(layer.thresholds.abs().max()) == 0 for _, _, layer in sparse_layers(dense))
    assert torch.equal(generate(dense, PROMPT, 4, temperature=0, decode_fn=step),
                       generate(model, PROMPT, 4, temperature=0))


def test_engine_refusals():
    check_engine("per-layer", 0, 4, "cpu")
    check_engine("persistent", None, 1, "cpu")  # the interpreter runs it on the CPU (conftest sets it)
    with pytest.raises(SystemExit, match="tensor parallel"):
        check_engine("persistent", 0, 1, "cuda")
    with pytest.raises(SystemExit, match="batch 1"):
        check_engine("persistent", None, 2, "cuda")
    with pytest.raises(SystemExit, match="CATS"):
        check_engine("persistent", None, 1, "cuda", "cats")
    model = tiny_model("llama", torch.float32)
    model.layers[0].attention.wqkv = torch.nn.Linear(64, 128)
    with pytest.raises(ValueError, match="sparsify"):
        persistent_layers(model)


def test_bad_inputs_are_refused():
    model = tiny_model("llama", torch.float32)
    layers = persistent_layers(model, stepped=True)
    args = (torch.zeros(1, 1, dtype=torch.int), torch.tensor([4]), model.freqs_cis, model.tok_embeddings.weight,
            layers.norm_weights, layers.weights, layers.thresholds, layers.scales, layers.zeros, layers.group_size,
            model.k_caches, model.v_caches, layers.errors, None, 1e-5, 0, True)

    def call(**change):
        names = ("token", "input_pos", "freqs_cis", "embedding", "norm_weights", "weights", "thresholds", "scales",
                 "zeros", "group_size", "k_caches", "v_caches")
        given = dict(zip(names, args[:12]))
        given.update(change)
        decode_layers(*given.values(), *args[12:])
    with pytest.raises(ValueError, match="batch 1"):
        call(token=torch.zeros(2, 1, dtype=torch.int))
    with pytest.raises(ValueError, match="contiguous"):
        call(weights=[w.transpose(1, 2) if i == 1 else w for i, w in enumerate(layers.weights)])
    with pytest.raises(ValueError, match="thresholds"):
        call(thresholds=[t[:, :1] for t in layers.thresholds])
    # [n_layer, groups, K] thresholds whose layers are not contiguous
    with pytest.raises(ValueError, match="each layer's contiguous"):
        call(thresholds=[t[:, None].expand(-1, w.shape[1], -1).transpose(1, 2)
                         for t, w in zip(layers.thresholds, layers.weights)])
    with pytest.raises(TypeError, match="int8"):
        call(scales=[torch.ones(2, w.shape[2]) for w in layers.weights])
    with pytest.raises(ValueError, match="RoPE"):
        call(freqs_cis=model.freqs_cis[:10])
    with pytest.raises(ValueError, match="q/k norms"):  # [n_layer, 2, head_dim 16]
        decode_layers(*args, qk_norm_weights=torch.ones(2, 2, 8))
    with pytest.raises(TypeError, match="biases"):
        decode_layers(*args, qkv_biases=torch.zeros(2, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="grouped_strip is a power of two"):
        decode_layers(*args, grouped_strip=96)
    with pytest.raises(ValueError, match="stages is the row loop's pipelining depth"):
        decode_layers(*args, stages=0)
    with pytest.raises(ValueError, match="block_rows is a power of two of at least 16"):
        decode_layers(*args, block_rows=48)
    with pytest.raises(TypeError, match="group-wise"):
        call(zeros=[torch.zeros(2, 1, w.shape[2], dtype=torch.float16) for w in layers.weights])
    quantized = persistent_layers(tiny_model("llama", torch.float32, group_quant=GroupQuant(4, 32, True)))
    grouped = dict(weights=quantized.weights, scales=quantized.scales, zeros=quantized.zeros, group_size=32)
    call(**grouped)  # well-formed: runs
    with pytest.raises(TypeError, match="groups of"):
        call(**{**grouped, "group_size": 48})
    with pytest.raises(ValueError, match=r"scales of group-wise weights are contiguous fp16 \(2, 1, 128\)"):
        call(**{**grouped, "group_size": 64})  # dim 64: one group of 64 rows, not two of 32
    with pytest.raises(ValueError, match="scales of group-wise weights"):
        call(**{**grouped, "scales": [s.float() for s in quantized.scales]})
    with pytest.raises(ValueError, match="zeros of group-wise weights"):
        call(**{**grouped, "zeros": [z[:, :1] for z in quantized.zeros]})
    with pytest.raises(TypeError, match="need their scales"):
        call(**{**grouped, "scales": []})


def test_persistent_loop_as_one_program_takes_every_tile_in_order():
    """The persistent launch (tickets, readiness counters, the waits' targets) run as one program, the only way the
    interpreter can: it takes every tile in order, so each wait must find its target already met (its polls are capped
    at 4, after which the error flag is set and check() raises). Its logits equal the per-layer model's (the reference
    decode, sparse ops one layer at a time) within the fp32 tolerance: int8 weights, and 4-bit ones in groups of 128
    whose K splits (down's) end in a short group."""
    for name, int8, quant in (("llama", True, None), ("groups", False, GroupQuant(4, 128, True))):
        model = tiny_model(name, torch.float32, int8=int8, per_channel=True, group_quant=quant)
        calibrate(model, 0.5)
        ref = copy.deepcopy(model)
        layers = persistent_layers(model, programs=1)
        assert compare_decode(ref, model, layers, steps=2, atol=ATOL[torch.float32]) > 0


def test_launched_copy_keeps_every_tensor_of_the_layers():
    """DecodeLayers.launched (bench_persistent's sweep, the GPU tests' stepped twin): a Qwen3 model's layers (q/k
    norms), relaunched as the persistent loop in one program, keep the per-layer logits, so the norms were not left
    behind; anything but a launch setting is refused."""
    model = family_model("qwen3", torch.float32)
    calibrate(model, 0.5)
    ref = copy.deepcopy(model)
    stepped = persistent_layers(model, stepped=True)
    one_program = stepped.launched(programs=1, stepped=False, tile_bytes=4096, stages=3, block_rows=32)
    assert (one_program.programs, one_program.stepped) == (1, False)
    assert one_program.tuning[0] == 4096 and one_program.tuning[4:] == (3, 32)  # tile_bytes; stages, block_rows
    assert (stepped.programs, stepped.stepped) == (0, True)
    assert compare_decode(ref, model, one_program, steps=2, atol=ATOL[torch.float32]) > 0
    with pytest.raises(TypeError, match="qk_norm_weights"):
        stepped.launched(qk_norm_weights=None)


def test_cli_refuses_what_the_engine_does_not_run():
    """At the CLI boundary a clear message, before any model is loaded, and no traceback."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "generate.py", "--engine", "persistent", "--batch_size", "2"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "batch 1 only" in out.stderr and "Traceback" not in out.stderr


def test_no_custom_op_gives_a_mutated_argument_a_default():
    # torch 2.11's ADInplaceOrView kernel of a mutating custom op indexes the arguments as passed, and the caller leaves
    # trailing defaults out: a mutated argument with a default raises IndexError there whenever it is left at it.
    import attention, sparse_gemv.ops, sparse_gemv.persistent, tp  # noqa: F401, E401 (each registers teal:: ops)
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("teal::"))
    assert names == ["teal::cats_gate_up", "teal::decode_attention", "teal::decode_layers",
                     "teal::one_shot_all_reduce_rmsnorm", "teal::sparse_gemv", "teal::sparse_gemv_partials"]
    for name in names:
        for arg in torch.ops.teal.__getattr__(name[len("teal::"):]).default._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                assert not arg.has_default_value(), f"{name}: mutated argument {arg.name} has a default"
