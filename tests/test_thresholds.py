"""Quantile tables, threshold lookup, greedy allocation on a tiny model, reference histogram import."""
import pytest
import torch

from model import config_hash
from sparse import sparsify
from tests.test_sparse import tiny_model
from thresholds.calibrate import LEVELS, greedy_block, projection_params, quantile_table
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
        dense_out = m.layers[0](h, torch.arange(64), m.freqs_cis[:64], m.causal_mask[None, None, :64])
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
            out = m.layers[0](h, torch.arange(64), m.freqs_cis[:64], m.causal_mask[None, None, :64])
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
