"""The fused CPU sparse GEMV (sparse_gemv/cpu_kernel.cpp) against the masked-dense reference, and its fallback."""
import functools

import pytest
import torch

from sparse_gemv import cpu
from sparse_gemv.ops import sparse_gemv_reference


@pytest.fixture
def threads(request):
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(request.param)
    return request.param


def calibrated_thresholds(k: int, groups: int, sparsity: float, per_channel: bool, scale: torch.Tensor,
                          g: torch.Generator) -> torch.Tensor:
    """Thresholds at the `sparsity` quantile of |x| over 4096 calibration draws, each group at its own (a group's
    sparsity varies by +-0.05 around the target, as calibrated layers' groups do): [G] or, per channel, [G, K]."""
    calibration = (torch.randn(4096, k, generator=g) * scale).abs()
    levels = [min(max(sparsity + 0.05 * (i - 1), 0.0), 0.95) if sparsity else 0.0 for i in range(groups)]
    if per_channel:
        return torch.stack([torch.quantile(calibration, q, dim=0) for q in levels])
    return torch.stack([torch.quantile(calibration, q) for q in levels])


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8])
@pytest.mark.parametrize("k,splits", [(83, (37, 19, 21)), (83, (77,)), (40, (4100, 33)), (129, (61, 61))])
def test_fused_kernel_matches_the_masked_reference_and_skips_rows(k, splits, tokens, sparsity, per_channel, threads):
    # Group sizes and K odd, none a multiple of the vector width; (4100, 33) is wider than the kernel's accumulator
    # (4096 columns), so a thread's range is cut. Thresholds are quantiles of calibration draws, so each sparsity is
    # real (checked). Every row no token keeps is then set to NaN: a kernel that read one, even to multiply it by a
    # zero, would return NaN. Tolerance: fp32 sums of up to 129 products in another order, 1e-5 relative and 1e-5 *
    # sqrt(K) absolute (the products are of unit scale).
    kernel = cpu.fused_kernel()
    assert kernel is not None, "the fused CPU kernel did not build here"
    g = torch.Generator().manual_seed(tokens * 7 + len(splits) + k)
    scale = torch.rand(k, generator=g) + 0.5  # channels of different scales, as a layer's inputs are
    x = torch.randn(tokens, k, generator=g) * scale
    x[:, 3] = 0.0  # an input at zero is never kept, at threshold 0 too
    weight_t = torch.randn(k, sum(splits), generator=g)
    thresholds = calibrated_thresholds(k, len(splits), sparsity, per_channel, scale, g)
    kept = x.abs()[:, None, :] > thresholds.view(len(splits), -1)  # [T, G, K]
    assert abs((1 - kept.float().mean()).item() - sparsity) < 0.15 + 1 / k  # a real sparsity, not all or nothing
    y = kernel(x, weight_t, thresholds, list(splits))
    torch.testing.assert_close(y, sparse_gemv_reference(x, weight_t, thresholds, splits), rtol=1e-5, atol=1e-5 * k ** 0.5)
    nan_rows, col = weight_t.clone(), 0
    for group, size in enumerate(splits):
        nan_rows[~kept[:, group].any(0), col:col + size] = float("nan")
        col += size
    assert torch.equal(kernel(x, nan_rows, thresholds, list(splits)), y)


def test_cpu_paths_use_the_fused_kernel_for_float32(monkeypatch):
    # The op's CPU branch (eager and under torch.compile) and SparseLinear's eager decode shortcut run the fused kernel
    # for fp32, not embedding_bag: with the embedding_bag path made to fail they still run, bit-identical to the kernel.
    from sparse import SparseLinear
    kernel = cpu.fused_kernel()
    assert kernel is not None
    monkeypatch.setattr(cpu, "sparse_gemv_bags", lambda *args: pytest.fail("the embedding_bag path ran"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, generator=g)
    layer = SparseLinear.from_linear(torch.nn.Linear(48, 40, bias=False), split_sizes=(24, 16))
    layer.thresholds.copy_(torch.tensor([0.6, 0.9]))
    want = kernel(x, layer.weight_t, layer.thresholds, [24, 16])
    assert torch.equal(torch.ops.teal.sparse_gemv(x, layer.weight_t, layer.thresholds, [24, 16]), want)
    assert torch.equal(layer(x[None]).view(1, -1), want)
    compiled = torch.compile(lambda t: torch.ops.teal.sparse_gemv(t, layer.weight_t, layer.thresholds, [24, 16]),
                             fullgraph=True)
    assert torch.equal(compiled(x), want)


@pytest.mark.parametrize("cause", ["no compiler", "compile error"])
def test_falls_back_to_embedding_bag_with_one_warning_where_the_build_fails(cause, monkeypatch, tmp_path, capfd):
    # No compiler on PATH, or a source that does not compile (as with a compiler that cannot build it): the kernel is
    # None, one warning line says so, and sparse_gemv_rows returns the embedding_bag product (checked against the
    # reference at 1e-5, the two summing in another order).
    if cause == "no compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    else:
        broken = tmp_path / "cpu_kernel.cpp"
        broken.write_text("#error no compiler here\n")
        monkeypatch.setattr(cpu, "KERNEL_SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    cpu.fused_kernel.cache_clear()
    try:
        assert cpu.fused_kernel() is None
        warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line.lower()]
        assert len(warnings) == 1 and "falls back to torch.embedding_bag" in warnings[0], warnings
        assert ("no C++ compiler" if cause == "no compiler" else "error: #error") in warnings[0]
        assert cpu.fused_kernel() is None and "warning" not in capfd.readouterr().err  # said once
        g = torch.Generator().manual_seed(1)
        x, weight_t = torch.randn(2, 30, generator=g), torch.randn(30, 24, generator=g)
        thresholds = torch.tensor([0.5, 1.0])
        torch.testing.assert_close(cpu.sparse_gemv_rows(x, weight_t, thresholds, [16, 8]),
                                   sparse_gemv_reference(x, weight_t, thresholds, [16, 8]), rtol=1e-5, atol=1e-5)
    finally:
        cpu.fused_kernel.cache_clear()  # the next caller loads the real kernel again
