"""The fused CPU sparse GEMV (sparse_gemv/cpu_kernel.cpp) against the masked-dense reference, for fp32 and quantized
weights, and its fallback."""
import ctypes
import functools
import mmap

import pytest
import torch

from sparse_gemv import cpu
from sparse_gemv.ops import sparse_gemv_reference
from sparse_gemv.quant import dequantize_grouped, pack_int4


@pytest.fixture
def threads(request):
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(request.param)
    return request.param


def calibrated_thresholds(k: int, groups: int, sparsity: float, per_channel: bool, scale: torch.Tensor,
                          g: torch.Generator, draws: int = 4096) -> torch.Tensor:
    """Thresholds at the `sparsity` quantile of |x| over `draws` calibration draws, each group at its own (a group's
    sparsity varies by +-0.05 around the target, as calibrated layers' groups do): [G] or, per channel, [G, K]."""
    calibration = (torch.randn(draws, k, generator=g) * scale).abs()
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


class PagedRows:
    """A [K, row_bytes] uint8 tensor whose rows are each one page of an anonymous mapping, so that rows can be made
    unreadable (mprotect PROT_NONE): a kernel that reads one crashes the test instead of passing it."""

    def __init__(self, rows: int):
        self.map = mmap.mmap(-1, rows * mmap.PAGESIZE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8).view(rows, mmap.PAGESIZE)

    def protect(self, rows: torch.Tensor, readable: bool) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for row in rows.tolist():
            flags = mmap.PROT_READ | mmap.PROT_WRITE if readable else 0  # 0: PROT_NONE
            assert libc.mprotect(self.address + row * mmap.PAGESIZE, mmap.PAGESIZE, flags) == 0, ctypes.get_errno()


# (bits, zero points, group size; 0: int8 with one fp32 scale per column), and split sizes summing to a page of bytes a
# row: not multiples of the 16-column line, each wider than the kernel's pass (1024 columns), so passes are cut;
# 4-bit ones even (two codes a byte) and multiples of 8 (the op's whole words), 8-bit ones multiples of 4, per-column
# int8 odd.
FORMATS = {"Q4_1": (4, True), "Q4_0": (4, False), "Q8_0": (8, False)}
SPLITS = {4: (2056, 4104, 2032), 8: (1036, 2044, 1016), 0: (1037, 2043, 1016)}


def quantized_problem(bits: int, zero_point: bool, group_size: int, k: int, g: torch.Generator):
    """Random codes, fp16 scales (and zeros) for a [K, N] weight with one page of bytes a row."""
    per_byte = 2 if bits == 4 else 1
    n = mmap.PAGESIZE * per_byte
    if bits == 4:
        codes = pack_int4(torch.randint(0, 16, (k, n), generator=g))
    else:
        codes = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    if not group_size:
        return codes, torch.rand(n, generator=g) * 0.02 + 0.01, None
    groups = -(-k // group_size)
    scales = (torch.rand(groups, n, generator=g) * 0.2 + 0.05).half()
    zeros = (torch.randn(groups, n, generator=g) * 0.5).half() if zero_point else None
    return codes, scales, zeros


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("fmt,group_size", [(fmt, size) for fmt in FORMATS for size in (32, 64, 128)]
                         + [("int8 per column", 0)])
def test_quantized_kernel_matches_the_dequantized_product_and_skips_rows(fmt, group_size, tokens, sparsity, threads):
    # Against the masked product with the dequantized weight (quant.dequantize_grouped, or int8 codes times their
    # column scales) in float64, with per-tensor and per-channel thresholds. K = 2 groups + 5 rows, so the last group
    # is partial; the second group's inputs are all 0, so it has no kept row at any threshold. Skipped rows are
    # poisoned two ways: every row no token keeps for any group of columns is an unreadable page (a read crashes),
    # and the scales and zeros of every (quantization group, group of columns) with no kept row are NaN (a read gives
    # NaN). Tolerance: fp32 sums of up to 261 products in another order, the zero point or -8 folded in once a
    # group: 1e-5 relative and 1e-5 * sqrt(K) * the largest |weight| absolute.
    bits, zero_point = FORMATS.get(fmt, (8, False))
    kernel = cpu.quantized_kernel()
    assert kernel is not None, "the fused CPU kernel did not build here"
    k = 2 * (group_size or 64) + 5
    splits = SPLITS[bits if group_size else 0]
    g = torch.Generator().manual_seed(tokens * 31 + k + bits)
    codes, scales, zeros = quantized_problem(bits, zero_point, group_size, k, g)
    scale = torch.rand(k, generator=g) + 0.5
    x = torch.randn(tokens, k, generator=g) * scale
    live = torch.ones(k, dtype=torch.bool)
    if group_size:
        live[group_size:2 * group_size] = False
        x[:, ~live] = 0.0
    if group_size:
        largest = dequantize_grouped(codes, scales, zeros, group_size).abs().max()
    else:
        largest = (codes.abs().amax(0) * scales).max()
    tol = dict(rtol=1e-5, atol=1e-5 * k ** 0.5 * largest.item())
    paged = PagedRows(k)
    weight_t = paged.tensor[:, :codes.shape[1]].view(codes.dtype)
    weight_t.copy_(codes)
    assert weight_t.is_contiguous()

    for per_channel in (False, True):
        thresholds = calibrated_thresholds(k, len(splits), sparsity, per_channel, scale, g, draws=512)
        kept = x.abs()[:, None, :] > thresholds.view(len(splits), -1)  # [T, G, K]
        assert abs((1 - kept[..., live].float().mean()).item() - sparsity) < 0.15 + 1 / k
        ref = sparse_gemv_reference(x.double(), codes, thresholds, splits, scales, zeros, group_size)
        poisoned_scales, poisoned_zeros = scales, zeros
        if group_size:
            poisoned_scales, poisoned_zeros = scales.clone(), None if zeros is None else zeros.clone()
            col, groups = 0, scales.shape[0]
            for split, size in enumerate(splits):
                rows_kept = torch.nn.functional.pad(kept[:, split].any(0), (0, groups * group_size - k))
                unread = ~rows_kept.view(groups, group_size).any(1)
                assert unread[1]
                poisoned_scales[unread, col:col + size] = float("nan")
                if zeros is not None:
                    poisoned_zeros[unread, col:col + size] = float("nan")
                col += size
        unread_rows = (~kept.any(0).any(0)).nonzero().view(-1)
        assert unread_rows.numel() > 0 or not group_size  # at least the zeroed group's
        paged.protect(unread_rows, readable=False)
        try:
            y = kernel(x, weight_t, poisoned_scales, poisoned_zeros, group_size, thresholds, list(splits))
        finally:
            paged.protect(unread_rows, readable=True)
        assert y.dtype == torch.float32 and y.shape == (tokens, sum(splits))
        torch.testing.assert_close(y.double(), ref, **tol)


def test_cpu_paths_use_the_fused_kernel_for_quantized_weights(monkeypatch):
    # The op's CPU branches (sparse_gemv and sparse_gemv_partials, eager and under torch.compile) and SparseLinear's
    # eager decode shortcut run the fused kernel for group-wise and per-column int8 weights, also at threshold 0: with
    # the paths it replaces made to fail they still run, bit-identical to the kernel. Activations in bf16 are
    # multiplied in fp32 and rounded once.
    from sparse import GroupQuant, SparseLinear
    from sparse_gemv import ops
    kernel = cpu.quantized_kernel()
    assert kernel is not None
    monkeypatch.setattr(ops, "grouped_sparse_gemv_cpu", lambda *args: pytest.fail("the dequantizing path ran"))
    monkeypatch.setattr(ops, "sparse_gemv_reference", lambda *args: pytest.fail("the masked reference ran"))
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(80, 48, bias=False)
    for quant in (dict(group_quant=GroupQuant(4, 32, True)), dict(group_quant=GroupQuant(8, 32, False)),
                  dict(int8=True)):
        layer = SparseLinear.from_linear(linear, split_sizes=(32, 16), **quant)
        extra = (layer.scales, layer.zeros, layer.group_size)
        for thresholds in ([0.6, 0.9], [0.0, 0.0]):
            layer.thresholds.copy_(torch.tensor(thresholds))
            for tokens in (1, 4):
                x = torch.randn(tokens, 80, generator=g)
                want = kernel(x, layer.weight_t, *extra[:2], layer.group_size, layer.thresholds, [32, 16])
                op_args = (layer.weight_t, layer.thresholds, [32, 16], False, *extra)
                assert torch.equal(torch.ops.teal.sparse_gemv(x, *op_args), want)
                assert torch.equal(torch.ops.teal.sparse_gemv_partials(x, *op_args), want[None])
                assert torch.equal(layer(x[:, None]).view(tokens, -1), want)
                bf16 = x.bfloat16()
                assert torch.equal(torch.ops.teal.sparse_gemv(bf16, *op_args),
                                   kernel(bf16.float(), layer.weight_t, *extra[:2], layer.group_size,
                                          layer.thresholds, [32, 16]).bfloat16())
        compiled = torch.compile(lambda t: torch.ops.teal.sparse_gemv(t, *op_args), fullgraph=True)
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
        # quantized weights: the op dequantizes group-wise ones a slab at a time, and masks and multiplies int8 ones
        from sparse import GroupQuant, SparseLinear
        linear = torch.nn.Linear(30, 24, bias=False)
        for quant in (dict(group_quant=GroupQuant(4, 32, True)), dict(int8=True)):
            layer = SparseLinear.from_linear(linear, split_sizes=(16, 8), **quant)
            layer.thresholds.copy_(thresholds)
            want = sparse_gemv_reference(x, layer.weight_t, thresholds, [16, 8], layer.scales, layer.zeros,
                                         layer.group_size)
            torch.testing.assert_close(layer(x[:, None]).view(2, -1), want, rtol=1e-5, atol=1e-5)
    finally:
        cpu.fused_kernel.cache_clear()  # the next caller loads the real kernel again
