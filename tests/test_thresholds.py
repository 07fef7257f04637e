"""Quantile tables, threshold lookup, greedy allocation on a tiny model, reference histogram import."""
import pytest
import torch

from model import config_hash
from sparse import sparsify
from tests.test_sparse import tiny_model
from thresholds.calibrate import LEVELS, block_stream, greedy_block, projection_params, quantile_table
from thresholds.file import ThresholdFile, import_reference_histograms, threshold_table


def test_quantile_table_matches_torch_quantile():
    x = torch.randn(100_000).abs()
    assert torch.allclose(quantile_table(x), torch.quantile(x, LEVELS), atol=1e-6)


def test_thresholds_realise_sparsity_on_held_out_data():
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randn(200_000, generator=g).abs(), torch.randn(200_000, generator=g).abs()
    table = quantile_table(calib)
    tf = ThresholdFile("t", "h", LEVELS, table.expand(1, 4, -1).clone())
    for s in (0.25, 0.4, 0.5, 0.65, 0.9):
        t = threshold_table(tf, s)[0, 0]
        assert abs(float((held <= t).float().mean()) - s) < 0.005


def test_bad_sparsity_and_foreign_file(tmp_path):
    m = tiny_model()
    tf = ThresholdFile("tiny", config_hash(m.config), LEVELS, torch.zeros(2, 4, len(LEVELS)))
    with pytest.raises(ValueError, match="outside"):
        threshold_table(tf, 1.5)
    tf.save(tmp_path / "t.safetensors")
    other = tiny_model().config
    other.dim = 128
    with pytest.raises(ValueError, match="calibrated for model"):
        ThresholdFile.load(tmp_path / "t.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        ThresholdFile.load(tmp_path / "bad.safetensors")


def test_greedy_reaches_target_and_beats_uniform_block_error():
    m = sparsify(tiny_model(4))
    m.setup_caches(1, 64)
    from sparse import set_mask_prefill
    idx = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(0))
    h = m.tok_embeddings(idx).detach()
    site_q = torch.zeros(2, 4, len(LEVELS))
    acts = {}
    hooks = [l.register_forward_pre_hook(lambda mod, a, k=k: acts.__setitem__(k, a[0])) for k, l in
             enumerate([m.layers[0].attention.wqkv, m.layers[0].attention.wo, m.layers[0].feed_forward.w13, m.layers[0].feed_forward.w2])]
    with torch.no_grad():
        dense_out = block_stream(m.layers[0], h, torch.arange(64), m.freqs_cis[:64], m.causal_mask[None, None, :64])
    for hk in hooks:
        hk.remove()
    for k, x in acts.items():
        site_q[0, k] = quantile_table(x.abs())
    set_mask_prefill(m, True)
    params = projection_params(m)
    path = greedy_block(m, 0, h, site_q, params, 0.05, 0.5)
    assert path[-1][0] >= 0.5
    uniform = torch.full((7,), path[-1][0], dtype=torch.float64)

    def block_error(s):
        from thresholds.calibrate import _table_at
        site = [0, 0, 0, 1, 2, 2, 3]
        with torch.no_grad():
            for (path_, layer), idxs in zip([(None, m.layers[0].attention.wqkv), (None, m.layers[0].attention.wo),
                                             (None, m.layers[0].feed_forward.w13), (None, m.layers[0].feed_forward.w2)],
                                            [(0, 1, 2), (3,), (4, 5), (6,)]):
                for g, p in enumerate(idxs):
                    layer.thresholds[g] = _table_at(site_q[0, site[p]], float(s[p])) if s[p] > 0 else 0.0
            out = block_stream(m.layers[0], h, torch.arange(64), m.freqs_cis[:64], m.causal_mask[None, None, :64])
        return float((out - dense_out).pow(2).mean())
    assert block_error(path[-1][1]) <= block_error(uniform) + 1e-12


def test_reference_histogram_import(tmp_path):
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    data, samples = {}, {}
    for layer in range(2):
        entry = {}
        for name in ("self_attn/h1", "self_attn/h2", "mlp/h1", "mlp/h2"):
            x = torch.randn(50_000, generator=g) * (layer + 1)
            edges = torch.linspace(-6 * (layer + 1), 6 * (layer + 1), 4001)
            entry[name] = torch.histc(x, 4000, float(edges[0]), float(edges[-1]))
            entry[name + "_centers"] = (edges[1:] + edges[:-1]) / 2
            samples[(layer, name)] = x
        data[str(layer)] = entry
    torch.save(data, tmp_path / "histograms.pt")
    tf = import_reference_histograms(tmp_path / "histograms.pt", m.config)
    assert tf.site_quantiles.shape == (2, 4, len(LEVELS))
    for (layer, name), x in samples.items():
        si = ("self_attn/h1", "self_attn/h2", "mlp/h1", "mlp/h2").index(name)
        expected = torch.quantile(x.abs(), torch.tensor([0.25, 0.5, 0.75]))
        got = tf.site_quantiles[layer, si, [250, 500, 750]]
        assert torch.allclose(got, expected, atol=0.01 * (layer + 1))


def test_perplexity_windows_and_scoring():
    from benchmark.perplexity import window_nll, window_starts
    assert window_starts(10_000, 4, 1000) == [0, 3000, 6000, 9000]
    with pytest.raises(ValueError, match="fewer than"):
        window_starts(3000, 4, 1000)
    # a dense model: prefill + scored part give the same NLL as one full forward
    m = tiny_model(5)
    m.setup_caches(1, 64)
    ids = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(1))
    nll, n = window_nll(m, ids, 20)
    with torch.no_grad():
        logits = m(ids[None], torch.arange(48))[0, 19:-1]
    ref = torch.nn.functional.cross_entropy(logits.float(), ids[20:].long(), reduction="sum")
    assert n == 28 and abs(nll - float(ref)) < 1e-3


def test_block_allocation_is_optimal_on_convex_costs():
    # Four blocks whose KL grows exponentially at different rates. The fine greedy path must reach every target
    # exactly and only ever raise a block. Its cost is within 3% of the best allocation on a 0.05 grid (brute
    # force; greedy on marginal costs is exact only where the interpolated curves are convex, which they are not
    # quite at the measured levels) and far below the uniform allocation's.
    import itertools
    from thresholds.calibrate import ALLOCATION_LEVELS, allocate_blocks
    rates = torch.tensor([4.0, 8.0, 12.0, 16.0])
    kl = 1e-4 * (torch.exp(rates[:, None] * ALLOCATION_LEVELS[None, :]) - 1)
    targets = torch.tensor([0.2, 0.4, 0.5])
    blocks = allocate_blocks(kl, ALLOCATION_LEVELS, targets)
    assert torch.allclose(blocks.mean(dim=1), targets, atol=1e-5)
    assert (blocks[1:] >= blocks[:-1] - 1e-6).all()
    assert (blocks[:, 0] > blocks[:, 3]).all()  # the least sensitive block takes the most sparsity

    def cost(s):  # the allocation's own model of KL: log-linear between measured levels
        lv, out = ALLOCATION_LEVELS.double(), 0.0
        for b, x in enumerate(s):
            if x > 0:
                i = min(int(torch.searchsorted(lv, torch.tensor(x, dtype=torch.float64), right=True)), len(lv) - 1)
                w = (x - lv[i - 1]) / (lv[i] - lv[i - 1])
                out += float(torch.exp(kl[b, i - 1].double().clamp_min(1e-7).log() * (1 - w) + kl[b, i].double().log() * w))
        return out
    grid = [round(0.05 * i, 2) for i in range(19)]
    table = [[cost([x if c == b else 0.0 for c in range(4)]) for x in grid] for b in range(4)]  # per block, per value
    for j, t in enumerate(targets.tolist()):
        best = min(sum(table[b][i] for b, i in enumerate(ix)) for ix in itertools.product(range(19), repeat=4)
                   if abs(sum(grid[i] for i in ix) / 4 - t) < 1e-6)
        assert cost(blocks[j].tolist()) <= best * 1.03
        assert cost(blocks[j].tolist()) < 0.5 * cost([t] * 4)


def test_block_kl_matches_whole_model_forwards():
    # block_kl runs the blocks before b once and only the tail per block: it must equal a plain forward of
    # the whole model with only block b's thresholds set, and be zero with everything dense.
    import torch.nn.functional as F
    from sparse import set_mask_prefill, set_thresholds
    from thresholds.calibrate import block_kl
    from thresholds.file import SITE_OF, interp, quantile_lookup
    from sparse import PROJECTIONS
    m = sparsify(tiny_model(3))
    m.setup_caches(1, 64)
    idx = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    quantiles = torch.sort(torch.rand(2, 4, len(LEVELS), generator=g) * 0.2, dim=-1).values
    targets = torch.linspace(0, 0.9, 91)
    greedy = torch.rand(91, 1, 7, generator=g) * targets[:, None, None] * 2
    tf = ThresholdFile("tiny", config_hash(m.config), LEVELS, quantiles, greedy_targets=targets,
                       greedy_sparsities=greedy.clamp(max=0.99).expand(91, 2, 7).clone())
    levels = torch.tensor([0.0, 0.3, 0.6])
    kl = block_kl(m, idx, tf, levels)
    assert torch.equal(kl[:, 0], torch.zeros(2)) and (kl[:, 1:] > 0).all()
    pos = torch.arange(64)
    with torch.no_grad():
        dense = F.log_softmax(m(idx, pos).float(), -1)
        site = torch.tensor([SITE_OF[p] for p in PROJECTIONS])
        for a in (1, 2):
            thr = quantile_lookup(tf.levels, tf.site_quantiles[:, site], interp(levels[a], targets, tf.greedy_sparsities))
            for b in range(2):
                table = torch.zeros(2, 7)
                table[b] = thr[b]
                set_thresholds(m, table)
                set_mask_prefill(m, True)
                lp = F.log_softmax(m(idx, pos).float(), -1)
                set_mask_prefill(m, False)
                want = float((dense.exp() * (dense - lp)).sum(-1).mean())
                assert abs(float(kl[b, a]) - want) <= 1e-6 + 1e-4 * want
