"""Sparse decoding end to end on the CPU against an independent masked-dense reference."""
import copy
import functools

import pytest
import torch

from generate import generate
from model import ModelArgs, Transformer
from sparse import LAYER_GROUPS, PROJECTIONS, SparsityMeter, set_thresholds, sparse_layers, sparsify


def tiny_model(seed=0, n_head=4, n_local_heads=2):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(vocab_size=96, n_layer=2, n_head=n_head, n_local_heads=n_local_heads, dim=64, intermediate_size=96,
                              block_size=128)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def masked_reference(dense, table):
    """The dense model with every linear's single-token input masked per projection group by forward hooks, then
    multiplied by the group's weight columns and its bias (if any) added: PyTorch math, no sparse layer."""
    ref = copy.deepcopy(dense)
    for i, block in enumerate(ref.layers):
        for path, projs in LAYER_GROUPS.items():
            owner, attr = path.split(".")
            lin = getattr(getattr(block, owner), attr)
            sizes = block.attention.qkv_sizes if path.endswith("wqkv") else (
                (block.feed_forward.intermediate_size,) * 2 if path.endswith("w13") else (lin.out_features,))

            # the same [K, N] weight layout the sparse layer multiplies by (prefill too), so the unmasked
            # arithmetic matches bit for bit and only the masking is under test: on a real model a
            # last-bit difference can move an activation across its threshold
            def hook(mod, args, out, i=i, projs=projs, sizes=sizes, w_t=lin.weight.detach().t().contiguous()):
                x = args[0]
                if x.shape[1] != 1:
                    y = x @ w_t
                else:
                    parts, col = [], 0
                    for n, p in zip(sizes, projs):
                        t = table[i, PROJECTIONS.index(p)]
                        parts.append(torch.where(x.abs().float() > t, x, 0) @ w_t[:, col:col + n])  # as kernels compare
                        col += n
                    y = torch.cat(parts, -1)
                return y if mod.bias is None else y + mod.bias
            lin.register_forward_hook(hook)
    return ref


@torch.no_grad()
def gap_thresholds(ref, table, prompt, tokens, quantile: float, margin: float) -> None:
    """Fill table [n_layer, 7] (ref's masked_reference table, read by its hooks) so that no input of a thresholded
    projection in the decode of `tokens` after `prompt` lies within `margin` of its threshold (relative): per
    projection group in the order the step computes them (a threshold changes only what comes after it), the inputs
    of every step, and the threshold in the widest relative gap among the 1% of sorted |inputs| around the quantile."""
    for i, block in enumerate(ref.layers):
        for path, projs in LAYER_GROUPS.items():
            owner, attr = path.split(".")
            seen = []
            hook = getattr(getattr(block, owner), attr).register_forward_pre_hook(
                lambda m, args: seen.append(args[0].abs().flatten().double()) if args[0].shape[1] == 1 else None)
            ref.setup_caches(1, prompt.shape[1] + len(tokens), exact=True)
            ref(prompt, torch.arange(prompt.shape[1], device=prompt.device))
            for step, token in enumerate(tokens):
                ref(token, torch.tensor([prompt.shape[1] + step], device=prompt.device))
            hook.remove()
            values = torch.cat(seen).sort().values
            at, half = int(quantile * values.numel()), values.numel() // 200
            window = values[at - half:at + half + 1]
            gaps = (window[1:] - window[:-1]) / window[:-1]
            k = int(gaps.argmax())
            threshold = float((window[k] + window[k + 1]) / 2)
            assert gaps[k] > 2.5 * margin, f"layer {i} {path}: no gap of {2.5 * margin} near the quantile"
            for proj in projs:
                table[i, PROJECTIONS.index(proj)] = threshold


def thresholds_at(model, s):
    """Per-projection thresholds giving sparsity s on a random prefill of the dense model."""
    table = torch.zeros(len(model.layers), 7)
    acts = {}
    hooks = [b.attention.wqkv.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__((i, 0), a[0])) for i, b in enumerate(model.layers)]
    hooks += [b.attention.wo.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__((i, 1), a[0])) for i, b in enumerate(model.layers)]
    hooks += [b.feed_forward.w13.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__((i, 2), a[0])) for i, b in enumerate(model.layers)]
    hooks += [b.feed_forward.w2.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__((i, 3), a[0])) for i, b in enumerate(model.layers)]
    model.setup_caches(1, 128)
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(3)), torch.arange(64))
    for h in hooks:
        h.remove()
    site = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
    for (i, k), x in acts.items():
        q = float(x.abs().flatten().quantile(s))
        for p, si in site.items():
            if si == k:
                table[i, PROJECTIONS.index(p)] = q
    return table


def test_sparse_decode_matches_masked_reference_token_for_token():
    dense = tiny_model()
    table = thresholds_at(dense, 0.5)
    ref = masked_reference(dense, table)
    sparse = sparsify(copy.deepcopy(dense))
    set_thresholds(sparse, table)
    prompt = torch.tensor([5, 17, 42, 7], dtype=torch.int)
    a = generate(sparse, prompt, 32, temperature=0)
    b = generate(ref, prompt, 32, temperature=0)
    assert torch.equal(a, b)
    # and the logits agree at every decode step (fp32, 1e-5 absolute)
    sparse.setup_caches(1, 64)
    ref.setup_caches(1, 64)
    with torch.no_grad():
        for pos in range(8):
            tok = a[:, pos:pos + 1]
            la, lb = sparse(tok, torch.tensor([pos])), ref(tok, torch.tensor([pos]))
            assert (la - lb).abs().max() < 1e-5


def test_sparsity_zero_equals_dense_and_meter_matches_target():
    dense = tiny_model(1)
    sparse = sparsify(copy.deepcopy(dense))
    prompt = torch.tensor([1, 2, 3], dtype=torch.int)
    assert torch.equal(generate(sparse, prompt, 24, temperature=0), generate(dense, prompt, 24, temperature=0))
    set_thresholds(sparse, thresholds_at(dense, 0.5))
    seq = generate(sparse, prompt, 48, temperature=0)
    meter = SparsityMeter(sparse)
    sparse.setup_caches(1, 64)
    with torch.no_grad():
        sparse(seq[:, :3], torch.arange(3))
        for pos in range(3, seq.shape[1]):
            sparse(seq[:, pos:pos + 1], torch.tensor([pos]))
    meter.close()
    assert abs(meter.model_sparsity() - 0.5) < 0.1  # thresholds from a different (prefill) distribution


def test_meter_counts_the_rows_a_batched_step_skips():
    # Two sequences' inputs to one down projection (threshold 0.5): each has 48 of 96 inputs at zero, overlapping in
    # 24, so half the inputs are masked but a batched step can skip only the 24 rows both leave out.
    sparse = sparsify(tiny_model(5))
    set_thresholds(sparse, torch.full((2, 7), 0.5))
    x = torch.ones(2, 1, 96)
    x[0, 0, :48] = 0
    x[1, 0, 24:72] = 0
    meter = SparsityMeter(sparse)
    with torch.no_grad():
        sparse.layers[0].feed_forward.w2(x)
    meter.close()
    assert meter.per_projection() == {(0, "down"): 0.5}
    assert meter.skipped_fraction() == {(0, "down"): 0.25}


def test_realized_sparsity_of_a_batch_counts_the_rows_some_sequence_keeps():
    from generate import measure_realized_sparsity
    dense = tiny_model(6)
    sparse = sparsify(copy.deepcopy(dense))
    set_thresholds(sparse, thresholds_at(dense, 0.5))
    prompt = torch.tensor([4, 8, 15], dtype=torch.int)
    one = generate(sparse, prompt, 24, temperature=0)
    alone = measure_realized_sparsity(sparse, one, 3)
    same = measure_realized_sparsity(sparse, one.repeat(2, 1), 3)  # two copies of one sequence skip the same rows
    assert same["sparse_bytes_moved"] == pytest.approx(alone["sparse_bytes_moved"], rel=1e-12)
    other = generate(sparse, torch.tensor([23, 42, 16], dtype=torch.int), 24, temperature=0)
    both = measure_realized_sparsity(sparse, torch.cat([one, other]), 3)
    # a different second sequence keeps rows the first skips: more bytes than either alone
    assert both["sparse_bytes_moved"] > max(alone["sparse_bytes_moved"],
                                           measure_realized_sparsity(sparse, other, 3)["sparse_bytes_moved"])


def test_changing_sparsity_does_not_recompile():
    import torch._dynamo.utils
    sparse = sparsify(tiny_model(2))
    sparse.setup_caches(1, 32)
    step = torch.compile(lambda m, x, p: m(x, p), fullgraph=True)
    x, pos = torch.tensor([[3]], dtype=torch.int), torch.tensor([4])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        step(sparse, x, pos)
        compiled = counters["stats"]["unique_graphs"]
        outs = []
        for s in (0.0, 0.3, 0.6):
            set_thresholds(sparse, torch.full((2, 7), s))
            outs.append(step(sparse, x, pos))
            assert torch.allclose(outs[-1], sparse(x, pos), atol=1e-5)  # the compiled graph sees the new thresholds
    assert counters["stats"]["unique_graphs"] == compiled  # ... without recompiling
    assert not torch.allclose(outs[0], outs[2])


def test_compiled_decode_guards_skip_unchanged_sparse_layers_and_see_changed_ones():
    # generate.py turns on dynamo's recursive dict tags: the guards of a module whose __dict__ (and its children's) is
    # unchanged since the compiled entry's first call are skipped, which a SparseLinear allows only with frozen
    # parameters (buffers get an aliasing guard) and immutable attributes. Checked in the guard tree of a compiled
    # decode step; and a changed attribute deep in the model must still be seen (recompile, then match eager), new
    # threshold values must not.
    import torch._dynamo.utils
    from sparse import SparseLinear
    assert torch._dynamo.config.use_recursive_dict_tags_for_guards  # set by importing generate (so bench_decode too)

    def forward(m, x, p):
        return m(x, p)

    def guard_nodes(n):
        yield n
        children = list(n.get_child_managers())
        if hasattr(n, "get_key_value_managers"):
            children += [m for pair in n.get_key_value_managers().values() for m in pair]
        for c in children:
            if c is not None:
                yield from guard_nodes(c)

    sparse = sparsify(tiny_model(5))
    set_thresholds(sparse, thresholds_at(sparse, 0.5))
    sparse.setup_caches(1, 32)
    torch._dynamo.reset()
    step = torch.compile(forward, fullgraph=True)
    x, pos = torch.tensor([[9]], dtype=torch.int), torch.tensor([3])
    graphs = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        step(sparse, x, pos)
        (entry,) = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(forward.__code__)
        layers = [n for n in guard_nodes(entry.guard_manager.root) if n.get_type_of_guarded_value() is SparseLinear]
        assert len(layers) == 8 and all(n.is_tag_safe() for n in layers)

        before = graphs["unique_graphs"]
        set_thresholds(sparse, thresholds_at(sparse, 0.3))
        assert (step(sparse, x, pos) - sparse(x, pos)).abs().max() < 1e-5
        assert graphs["unique_graphs"] == before
        sparse.layers[-1].feed_forward.w2.decode_partials = "sum"  # another graph: partial sums to the final norm
        assert (step(sparse, x, pos) - sparse(x, pos)).abs().max() < 1e-5
        assert graphs["unique_graphs"] == before + 1
    torch._dynamo.reset()


def test_compiled_prefill_matches_eager_for_any_prompt_length():
    # generate.py --compile_prefill: one dynamic-shape graph serves every prompt length, with the same tokens as eager
    # (longest first: the caches, sized by the first generation, are kept, as GPT-Fast keeps them)
    import torch._dynamo.utils
    from generate import prefill
    dense = tiny_model(4)
    sparse = sparsify(copy.deepcopy(dense))
    set_thresholds(sparse, thresholds_at(dense, 0.5))
    compiled = torch.compile(prefill, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]  # the counters outlive torch._dynamo.reset: count this test's graphs
    for length in (11, 7, 4):
        prompt = torch.randint(0, 96, (length,), dtype=torch.int, generator=torch.Generator().manual_seed(length))
        assert torch.equal(generate(sparse, prompt, 12, prefill_fn=compiled, temperature=0),
                           generate(sparse, prompt, 12, temperature=0))
    assert graphs["unique_graphs"] - before == 1


def test_compiled_layers_leave_their_partial_sums_to_the_reader():
    # Under torch.compile the layers that feed a norm (o, down) return fp32 partial sums that the compiled graph adds
    # up with the residual inside that RMSNorm, and q/k/v hand theirs to the attention op; gate/up, the last down
    # (its norm is fused into the LM head's matmul) and row-sharded tensor-parallel layers (their output goes to an
    # all-reduce) keep the kernel's reduction. Counted in the graph dynamo traces, and the compiled logits match
    # eager within fp32 error.
    from collections import Counter
    from tp import apply_tp
    sparse = sparsify(tiny_model(4))
    set_thresholds(sparse, thresholds_at(sparse, 0.5))
    sparse.setup_caches(1, 32)
    calls = Counter()

    def count_ops(gm, example_inputs):
        calls.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "teal" in str(n.target))
        return gm

    x, pos = torch.tensor([[7]], dtype=torch.int), torch.tensor([5])
    with torch.no_grad():
        got = torch.compile(sparse, backend=count_ops, fullgraph=True)(x, pos)
        want = sparse(x, pos)
    torch._dynamo.reset()
    assert calls == Counter({"teal.sparse_gemv": 3, "teal.sparse_gemv_partials": 5, "teal.decode_attention.default": 2})
    assert (got - want).abs().max() < 1e-5
    # sharded after or before it is made sparse (as bench_decode builds random models)
    for model in (apply_tp(sparse, rank=0, world=2), sparsify(apply_tp(tiny_model(4), rank=0, world=2))):
        assert [(b.attention.wqkv.decode_partials, b.attention.wo.decode_partials, b.feed_forward.w13.decode_partials,
                 b.feed_forward.w2.decode_partials) for b in model.layers] == [("keep", "reduce", "reduce", "reduce")] * 2


def test_int8_sparse_decode_matches_the_masked_dequantized_model():
    # int8 layers (per-output-channel scales) against the masked reference built from the dense model whose seven
    # projections hold the dequantized weights q * scale: the same tokens, logits within fp32 rounding.
    from sparse import SparseLinear, column_norms, quantize_int8
    dense = tiny_model(6)
    table = thresholds_at(dense, 0.5)
    dequantized = copy.deepcopy(dense)
    with torch.no_grad():
        for block in dequantized.layers:
            for lin in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2):
                q, scales = quantize_int8(lin.weight)
                lin.weight.copy_(q.float() * scales[:, None])
    ref = masked_reference(dequantized, table)
    sparse = sparsify(copy.deepcopy(dense), int8=True)
    set_thresholds(sparse, table)
    layer = sparse.layers[0].feed_forward.w13
    assert isinstance(layer, SparseLinear) and layer.weight_t.dtype == torch.int8 and layer.scales.shape == (192,)
    # weight-aware scores see the dequantized weight
    plain = SparseLinear.from_linear(dequantized.layers[0].feed_forward.w13, [96, 96])
    for got, want in zip(column_norms(layer), column_norms(plain)):
        assert torch.allclose(got, want, rtol=1e-5)
    prompt = torch.tensor([5, 17, 42, 7], dtype=torch.int)
    a = generate(sparse, prompt, 32, temperature=0)
    assert torch.equal(a, generate(ref, prompt, 32, temperature=0))
    sparse.setup_caches(1, 64)
    ref.setup_caches(1, 64)
    with torch.no_grad():
        assert (sparse(a[:, :4], torch.arange(4)) - ref(a[:, :4], torch.arange(4))).abs().max() < 1e-4  # prefill
        for pos in range(4, 12):
            tok = a[:, pos:pos + 1]
            assert (sparse(tok, torch.tensor([pos])) - ref(tok, torch.tensor([pos]))).abs().max() < 1e-4
    with pytest.raises(ValueError, match="weight format"):
        sparsify(sparse)  # already int8: not silently mixed with another format


def test_kernel_variant_is_chosen_per_layer():
    # --sparse_kernel auto: bf16 stays predicated below COMPACT_FROM; int8 gate/up lists kept rows from 0.5
    from generate import COMPACT_FROM, INT8_GATE_UP_COMPACT_FROM, compact_layers
    assert compact_layers("auto", 0.5, quantized=False) == ()
    assert compact_layers("auto", INT8_GATE_UP_COMPACT_FROM, quantized=True) == ("feed_forward.w13",)
    assert compact_layers("auto", 0.45, quantized=True) == ()
    assert compact_layers("auto", COMPACT_FROM, quantized=False) == tuple(LAYER_GROUPS)
    assert compact_layers("predicated", 0.9, quantized=True) == ()
    assert compact_layers("compact", 0.1, quantized=False) == tuple(LAYER_GROUPS)
    model = sparsify(tiny_model(), compact=compact_layers("mlp-compact", 0.0, quantized=False))
    for block in model.layers:
        assert (block.attention.wqkv.compact, block.attention.wo.compact) == (False, False)
        assert (block.feed_forward.w13.compact, block.feed_forward.w2.compact) == (True, True)
    assert all(layer.compact for _, _, layer in sparse_layers(sparsify(tiny_model(), compact=True)))
    assert [path for _, path, layer in sparse_layers(sparsify(tiny_model(), compact="attention.wo"))
            if layer.compact] == ["attention.wo", "attention.wo"]
    with pytest.raises(ValueError, match="feed_forward.w4"):
        sparsify(tiny_model(), compact=("feed_forward.w4",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [(64,), (64, 32, 32), (96, 96)])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_embedding_bag_path_skips_rows_and_matches_the_reference(dtype, splits, tokens, per_channel, threads, request):
    # The CPU decode product through embedding_bag (bf16 and fp16, and fp32 where the fused kernel cannot be built)
    # against the masked-dense reference. Every skipped row is
    # set to NaN: a path that read it, even to multiply it by zero, would return NaN. Tolerance: the two sum in a
    # different order, within 1e-5 relative in fp32 and two bf16 steps in bf16. With two threads a one-group layer's
    # columns are cut into two bags.
    from sparse_gemv.cpu import sparse_gemv_bags, units_of
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(threads)
    unit = units_of(splits, threads, torch.device("cpu"))[0]
    assert sum(splits) // unit >= threads and all(s % unit == 0 for s in splits)
    from sparse_gemv.ops import sparse_gemv_reference
    g = torch.Generator().manual_seed(tokens + len(splits))
    k = 80
    x = torch.randn(tokens, k, generator=g).to(dtype)
    x[:, 5] = 0.0  # an input at zero is never kept
    weight_t = torch.randn(k, sum(splits), generator=g).to(dtype)
    shape = (len(splits), k) if per_channel else (len(splits),)
    thresholds = torch.rand(shape, generator=g) * 1.2
    if not per_channel:
        thresholds[-1] = 10.0  # the last group keeps no row: its columns are zero
    y = sparse_gemv_bags(x, weight_t, thresholds, splits)
    nan_rows = weight_t.clone()
    col = 0
    for group, size in enumerate(splits):
        skipped = (x.abs().float() <= thresholds[group]).all(0)  # rows no token keeps
        nan_rows[skipped, col:col + size] = float("nan")
        col += size
    assert torch.equal(sparse_gemv_bags(x, nan_rows, thresholds, splits), y)
    want = sparse_gemv_reference(x, weight_t, thresholds, splits)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2e-2)
    torch.testing.assert_close(y, want, **tol)
    if not per_channel:
        assert not y[:, -splits[-1]:].any()
