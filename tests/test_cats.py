"""CATS mode: the MLP against the formula written out in PyTorch (eager, compiled, and the Triton kernel under
TRITON_INTERPRET), decode against a masked reference model, the realised-sparsity counts, and calibration to target."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from generate import generate, measure_realized_sparsity, weight_bytes
from sparse import CatsFeedForward, SparsityMeter, catsify, set_cats_thresholds, set_mask_prefill
from sparse_gemv.cats import cats_gate_up_triton
from tests.test_sparse import tiny_model


def cats_formula(x, w_gate, w_up, w_down, t):
    """y = W_down (a * 1[|a| > t] * (x W_up^T)), a = SiLU(x W_gate^T), in float64."""
    x, w_gate, w_up, w_down = (v.double() for v in (x, w_gate, w_up, w_down))
    a = F.silu(x @ w_gate.T)
    return (torch.where(a.abs() > t, a, 0) * (x @ w_up.T)) @ w_down.T


def tiny_cats(seed=0):
    dense = tiny_model(seed)
    return dense, catsify(copy.deepcopy(dense))


@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 1),
                                          (torch.bfloat16, 3)])
def test_kernel_matches_the_formula(dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    d, inter = 72, 50  # neither a multiple of the tiles: the edge masks are exercised
    x = torch.randn(tokens, d, generator=g).to(dtype)
    w13 = (torch.randn(2 * inter, d, generator=g) / d ** 0.5).to(dtype)
    t = 0.3
    h = cats_gate_up_triton(x, w13, torch.tensor([t])).double()
    a = F.silu(x.double() @ w13[:inter].double().T)
    ref = torch.where(a.abs() > t, a, 0) * (x.double() @ w13[inter:].double().T)
    clear = (a.abs() - t).abs() > 1e-3  # the kernel's fp32 sums may fall either side of t right at it
    assert 0.3 < float((a.abs() <= t).double().mean()) < 0.9
    assert torch.equal((h == 0)[clear], (ref == 0)[clear])
    # fp32: products summed in another order; bf16: h rounded to bf16 once (8 bits of mantissa)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(h[clear], ref[clear], rtol=tol, atol=tol)


@pytest.mark.parametrize("compiled", [False, True])
def test_mlp_matches_the_formula_eager_and_compiled(compiled):
    dense, cats = tiny_cats()
    ff = cats.layers[0].feed_forward
    ref_ff = dense.layers[0].feed_forward
    w_gate, w_up = ref_ff.w13.weight.detach().chunk(2)
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    run = torch.compile(ff, fullgraph=True) if compiled else ff
    for t in (0.0, 0.1, 0.3):
        ff.threshold.fill_(t)
        with torch.no_grad():
            step = torch.cat([run(x[:, i:i + 1]) for i in range(4)], dim=1)  # decode steps, one token each
            set_mask_prefill(cats, True)
            masked = run(x)  # the same masking over four positions at once
            set_mask_prefill(cats, False)
            prefill = run(x)  # dense, as a prefill is
        ref = cats_formula(x, w_gate, w_up, ref_ff.w2.weight.detach(), t)
        torch.testing.assert_close(step.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masked.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefill.double(), cats_formula(x, w_gate, w_up, ref_ff.w2.weight.detach(), -1.0),
                                   rtol=1e-5, atol=1e-5)


def masked_cats_reference(dense, thresholds):
    """The dense model with each MLP's SiLU(gate) masked by a forward hook on the gate/up linear (decode steps)."""
    ref = copy.deepcopy(dense)
    for i, block in enumerate(ref.layers):
        inter = block.feed_forward.intermediate_size

        def hook(mod, args, out, t=float(thresholds[i])):
            if args[0].shape[1] != 1:
                return out
            gate, up = out.split(inter, dim=-1)
            # F.silu(gate') * up == 0 where gate' = 0: mask by zeroing gate where SiLU(gate) is under threshold
            return torch.cat([torch.where(F.silu(gate).abs() > t, gate, 0), up], dim=-1)
        block.feed_forward.w13.register_forward_hook(hook)
    return ref


def test_decode_matches_masked_reference_and_meter_counts_mlp_and_model_wide():
    dense, cats = tiny_cats(3)
    thresholds = torch.tensor([0.08, 0.12])
    set_cats_thresholds(cats, thresholds)
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(4))
    seq = generate(cats, prompt, 30, temperature=0)
    ref = masked_cats_reference(dense, thresholds)
    assert torch.equal(seq, generate(ref, prompt, 30, temperature=0))
    assert not torch.equal(seq, generate(dense, prompt, 30, temperature=0))  # the thresholds change the text

    # the share of SiLU(gate) under threshold in the decoded positions, counted directly in the reference's steps
    # (this hook runs after the masking hook: a masked gate is 0 there, and SiLU(0) = 0)
    acts = []
    hooks = [b.feed_forward.w13.register_forward_hook(
        lambda m, a, out, i=i: acts.append((i, F.silu(out[..., :96]).abs() <= thresholds[i])))
        for i, b in enumerate(ref.layers)]
    ref.setup_caches(1, seq.shape[1])
    with torch.no_grad():
        ref(seq[:, :5], torch.arange(5))
        acts.clear()  # the prefill is dense
        for pos in range(5, seq.shape[1] - 1):
            ref(seq[:, pos:pos + 1], torch.tensor([pos]))
    for h in hooks:
        h.remove()
    dropped = torch.cat([m.flatten() for _, m in acts]).double().mean()
    real = measure_realized_sparsity(cats, seq, 5)
    # model-wide: up and down (2 x 64 x 96 weights of a block's 3 x 64 x 64 in q/k/v and o + 3 x 64 x 96) at the
    # dropped share
    assert real["model"] == pytest.approx(float(dropped) * 2 * 96 / (3 * 64 + 3 * 96), abs=1e-9)
    assert real["mlp"] == pytest.approx(float(dropped) * 2 / 3, abs=1e-9)
    sizes = weight_bytes(cats)
    assert sizes["sparse"] == 2 * 2 * 64 * 96 * 4  # two blocks' up and down, fp32
    assert real["sparse_bytes_moved"] == pytest.approx((1 - float(dropped)) * sizes["sparse"])


def test_teal_meter_is_unchanged_by_counting_every_projection():
    from sparse import sparsify
    m = sparsify(tiny_model(5))
    meter = SparsityMeter(m)
    x = torch.ones(1, 1, 96)
    x[..., :48] = 0
    with torch.no_grad():
        m.layers[0].feed_forward.w2(x)
    meter.close()
    assert meter.per_projection() == {(0, "down"): 0.5}
    # one down projection's weights at 0.5, of two blocks' seven projections
    assert meter.model_sparsity() == pytest.approx(0.5 * 64 * 96 / (2 * (3 * 64 * 64 + 3 * 64 * 96)))


def tiny_checkpoint(tmp_path, default_checkpoint):
    """A tiny random model (3 blocks) with the default tokenizer, saved as a converted checkpoint."""
    from model import ModelArgs, Transformer
    from safetensors.torch import save_file
    args = ModelArgs(vocab_size=49152, n_layer=3, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                     block_size=1024, name="tiny-cats")
    torch.manual_seed(0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "model_config.json").write_text(args.to_json())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / f, ckpt / f)
    return model, args, ckpt


def test_calibration_reaches_the_target_on_calibration_text(tmp_path, default_checkpoint):
    """thresholds.calibrate on a tiny random model with the default tokenizer writes CATS tables whose held
    thresholds drop the target share of SiLU(gate) within 0.01 in every layer on the calibration text, and within
    0.01 over all layers (0.02 in each) on calibration text the calibration did not see."""
    from tests.conftest import TEXT_DATA
    from thresholds.calibrate import calibrate, read_tokens
    from thresholds.file import ThresholdFile, apply_thresholds
    from tokenizer import load_tokenizer

    model, args, ckpt = tiny_checkpoint(tmp_path, default_checkpoint)
    out = tmp_path / "t.safetensors"
    text = TEXT_DATA / "wiki-calibration.txt"
    calibrate(ckpt, out, data=text, tokens=2048, seq_len=512, greedy=False, allocation=False, held_targets=(0.5, 0.7),
              held_tokens=2048, held_seq_len=512)
    tf = ThresholdFile.load(out, args)
    assert "cats" in tf.modes() and tf.held["cats"].shape == (2, 3) and tf.cats_quantiles.shape == (3, len(tf.levels))
    assert json.loads(json.dumps(tf.provenance))["tokens"] == 2048

    ids, _ = read_tokens(load_tokenizer(ckpt), text)
    cats = catsify(model)
    cats.setup_caches(4, 512)
    for text, tol in ((ids[:2048], 0.01), (ids[4096:6144], 0.02)):  # calibrated on, and further on in the text
        for target in (0.5, 0.7):
            apply_thresholds(cats, tf, target, "cats")
            meter = SparsityMeter(cats)
            set_mask_prefill(cats, True)  # every position as a decode step masks it
            with torch.no_grad():
                cats(text.view(4, 512), torch.arange(512))
            set_mask_prefill(cats, False)
            meter.close()
            per_layer = [meter.per_projection()[(i, "down")] for i in range(3)]
            assert all(abs(s - target) < tol for s in per_layer), per_layer
            assert abs(sum(per_layer) / 3 - target) < 0.01, per_layer


def test_calibration_holds_at_most_two_fp32_models_at_once(tmp_path, default_checkpoint, monkeypatch):
    """Calibration loads the TEAL model, the per-channel (weight-aware) one and the CATS one once each, and the CATS
    one only after the TEAL stages freed theirs: never more than two models alive, one of them being loaded."""
    import gc
    import weakref

    import thresholds.calibrate as calibrate_module
    from tests.conftest import TEXT_DATA
    from thresholds.file import ThresholdFile

    _, args, ckpt = tiny_checkpoint(tmp_path, default_checkpoint)
    loaded, alive_at_load = [], []
    load_model = calibrate_module.load_model

    def tracking_load_model(*a, **kw):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in loaded))
        model = load_model(*a, **kw)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(calibrate_module, "load_model", tracking_load_model)
    out = tmp_path / "t.safetensors"
    calibrate_module.calibrate(ckpt, out, data=TEXT_DATA / "wiki-calibration.txt", tokens=512, seq_len=256,
                               greedy=False, allocation=False, held_targets=(0.5,), held_tokens=512, held_seq_len=256)
    assert alive_at_load == [0, 1, 0]  # TEAL; weight-aware beside it; CATS alone
    tf = ThresholdFile.load(out, args)
    assert tf.modes() == ["uniform", "weight-aware", "cats"] and set(tf.held) == set(tf.modes())
    assert tf.cats_quantiles.shape == (3, len(tf.levels)) and tf.held["cats"].shape == (1, 3)


def test_bench_decode_cats_thresholds_from_a_random_prefill():
    """bench_decode's CATS rows on random weights: per-MLP quantiles of |SiLU(gate)| on a random-token prefill, which
    drop that share of the prefill's activations."""
    from benchmark.bench_decode import calibrate_cats_on_random_prefill, category
    _, cats = tiny_cats(6)
    table = calibrate_cats_on_random_prefill(cats, [0.0, 0.5], n_tokens=64)
    assert torch.equal(table[0.0], torch.zeros(2))
    gate = []
    hooks = [b.feed_forward.register_forward_pre_hook(lambda m, a, i=i: gate.append(
        F.silu(F.linear(a[0], m.w13[:96])).abs() <= table[0.5][i])) for i, b in enumerate(cats.layers)]
    with torch.no_grad():  # the same random tokens (seed 0) as the calibration's prefill
        cats(torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(0)), torch.arange(64))
    for h in hooks:
        h.remove()
    assert [float(g.double().mean()) for g in gate] == pytest.approx([0.5, 0.5], abs=1e-3)
    assert category("_cats_gate_up_kernel_0d1d") == "cats gate/up"
