"""The benchmarks' own bookkeeping: kernel classification of the decode profile, the Nsight Compute parser, the
revisions and configs of the kernel A/B, the split rule its measurements set, and the GEMV timeline's instrumented
kernel and statistics."""
from pathlib import Path

import pytest
import torch

from benchmark import ab_gemv, ab_grouped
from benchmark.bench_decode import category
from benchmark.profile_gemv import parse
from sparse import GroupQuant
from sparse_gemv.kernels import pick_config


def test_decode_profile_categories():
    # Inductor kernels fused around the sparse op carry "sparse_gemv" in their names but are not GEMVs.
    assert category("_sparse_gemv_kernel") == "sparse_gemv"
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_sparse_gemv_view_14") == "norm"
    assert category("triton_poi_fused_mul_silu_sparse_gemv_split_view_9") == "other"
    assert category("triton_red_fused__to_copy__unsafe_view_add_mean_mm_mul_pow_rsqrt_select_t_view_17") == "inductor mm"
    assert category("triton_red_fused__softmax__to_copy_argmax_div_exp_exponential_sub_22") == "sampling"
    assert category("triton_per_fused__safe_softmax_add_exp_index_prepare_softmax_online") == "attention"
    assert category("_decode_attention_kernel") == "attention"
    assert category("triton_red_fused__to_copy__unsafe_view_add_decode_attention_index_mean_mm_mul_pow_rsqrt_t_") == \
        "inductor mm"
    assert category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "allreduce"
    assert category("triton_red_fused__unsafe_view_all_reduce_mm_mul_silu_split_t_view_12") == "inductor mm"
    assert category("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "cublas"


def test_ncu_csv_parser_keeps_the_last_launch_of_each_case():
    header = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    lines = []
    launches = [(0, "vectorized_elementwise_kernel<FillFunctor>", "1"), (1, "nvjet_gemv", "40,000"),
                (2, "_sparse_gemv_kernel", "50,000"), (3, "_sparse_gemv_kernel", "51,000"),
                (4, "_sparse_gemv_kernel", "30,000"), (5, "_sparse_gemv_kernel", "31,000")]
    for i, name, duration in launches:
        lines.append(f'"{i}","{name}","GPU Speed Of Light Throughput","Duration","ns","{duration}"\n')
        lines.append(f'"{i}","{name}","Occupancy","Achieved Occupancy","%","12.5"\n')
    text = "==PROF== Connected\n" + header + "".join(lines)
    labels = ["a s=0", "a s=0", "a s=0.5", "a s=0.5"]
    out = {e["case"]: e for e in parse(text, labels)}
    assert set(out) == {"a s=0", "a s=0.5", "a cublas s=0.00 nvjet_gemv"}
    assert out["a s=0"]["metrics"]["GPU Speed Of Light Throughput/Duration [ns]"] == 51000.0
    assert out["a s=0.5"]["metrics"]["GPU Speed Of Light Throughput/Duration [ns]"] == 31000.0
    assert out["a cublas s=0.00 nvjet_gemv"]["metrics"]["Occupancy/Achieved Occupancy [%]"] == 12.5


def test_ab_gemv_times_each_revision_at_its_own_pick_then_common_alternatives():
    module = ab_gemv.load_kernels("a", Path("sparse_gemv/kernels.py"))
    k, groups, sms = 14336, [4096], 132
    cfgs = ab_gemv.configs(module, k, groups, sms)
    assert cfgs[:2] == [(module.pick_config(k, groups, False, sms), True), (module.pick_config(k, groups, True, sms), True)]
    alternatives = [c for c, picked in cfgs[2:]]
    assert alternatives and not any(picked for _, picked in cfgs[2:]) and not any(c["COMPACT"] for c in alternatives)
    assert all(k // c["SPLIT_K"] >= c["BLOCK_K"] and 4096 // c["BLOCK_N"] * c["SPLIT_K"] <= 4 * sms for c in alternatives)
    assert ab_gemv.configs(module, k, groups, sms, picked_only=True) == cfgs[:2]
    with pytest.raises(SystemExit, match="two or more"):
        ab_gemv.main(["a=sparse_gemv/kernels.py"])
    with pytest.raises(SystemExit, match="two or more"):
        ab_gemv.main(["a=sparse_gemv/kernels.py", "b=no/such/kernels.py"])


def test_ab_grouped_tiles_run_the_named_pipelining_depth_else_the_revisions_own():
    # A tile without sSTAGES runs the depth of its revision's pick for that form, predicated or compact, whatever the
    # tile's width (here the predicated pick's one stage, the compact pick's three), so an A/B of two revisions names
    # the depth to compare like with like.
    module = ab_gemv.load_kernels("a", Path("sparse_gemv/grouped.py"))
    quant = GroupQuant(4, 128, True)
    k, groups, sms = 4096, [14336, 14336], 132
    tiles = ["a:512x128s3", "a:256x128", "a:256x64c", "a:512x128s2r128", "b:128x128"]
    cfgs = ab_grouped.configs(module, "a", k, groups, quant, sms, tiles)
    assert [picked for _, picked in cfgs] == [True, True, False, False, False, False]
    own = module.pick_grouped_config(k, groups, False, sms, 128)
    assert cfgs[0][0] == own and own["STAGES"] == 1
    assert [(c["BLOCK_N"], c["BLOCK_K"], c["STAGES"], c["COMPACT"]) for c, _ in cfgs[2:]] == [
        (512, 128, 3, False), (256, 128, 1, False), (256, 64, 3, True), (512, 128, 2, False)]
    # rREGISTERS caps the launch's registers (Triton's maxnreg); the other tiles leave the cap to the compiler
    assert [c.get("maxnreg") for c, _ in cfgs] == [None] * 5 + [128]
    with pytest.raises(SystemExit, match="sSTAGES"):
        ab_grouped.main(["a=sparse_gemv/grouped.py", "b=sparse_gemv/grouped.py", "--tiles", "a:256x128x3"])


def test_k_split_rule_from_the_ab_measurements():
    # On 132 SMs a split's reduction outweighs a second program per SM for 4096x4096 at every sparsity;
    # 4096x14336 (one program per SM too, but long K) and the 70B TP4 q/k/v (80 strips) still want their splits.
    split = lambda k, groups: pick_config(k, groups, False, 132)["SPLIT_K"]
    assert split(4096, [4096]) == 1
    assert split(14336, [4096]) == 2
    assert split(8192, [2048, 256, 256]) == 4
    assert split(4096, [14336]) == 2 and pick_config(4096, [14336], False, 132)["BLOCK_N"] == 64


def test_partial_sums_split_a_grid_of_one_and_a_half_programs_per_sm():
    # Returning partials, 8b q/k/v (192 strips of 32 on 132 SMs) is faster split in two (H100); the other decode
    # shapes that return partials keep the split they take with the reduction.
    split = lambda k, groups, reduce: pick_config(k, groups, False, 132, reduce=reduce)["SPLIT_K"]
    assert (split(4096, [4096, 1024, 1024], True), split(4096, [4096, 1024, 1024], False)) == (1, 2)
    for k, groups in ((14336, [4096]), (8192, [4096, 512, 512]), (8192, [2048, 256, 256]), (4096, [14336, 14336])):
        assert split(k, groups, False) == split(k, groups, True)
    assert split(4096, [4096], False) == 2  # unsplit with the reduction (one short wave), in two without
    compact = [pick_config(4096, [4096, 1024, 1024], True, 132, reduce=r) for r in (True, False)]
    assert compact[0] == compact[1]  # kept-row lists split as before


def test_int8_down_projection_tiles():
    # int8 8b down (K 14336, N 4096) takes 64 x 256 tiles in four splits (faster in the H100 decode step); the other
    # int8 8B shapes keep the bf16 picks, and bf16 down keeps 32 x 256 in two.
    tile = lambda c: (c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"])
    assert tile(pick_config(14336, [4096], False, 132, reduce=False, int8=True)) == (64, 256, 4)
    assert tile(pick_config(14336, [4096], False, 132, reduce=False)) == (32, 256, 2)
    for k, groups in ((4096, [4096]), (4096, [4096, 1024, 1024]), (4096, [14336, 14336])):
        for compact in (False, True):
            assert pick_config(k, groups, compact, 132, int8=True) == pick_config(k, groups, compact, 132)
    assert pick_config(14336, [4096], True, 132, int8=True) == pick_config(14336, [4096], True, 132)


def test_gemv_timeline_instruments_the_current_kernel():
    # The timeline's stamps are added to a copy of kernels.py after named lines: they must all still be there (the
    # module loads, its kernel takes the stamp buffer), and a kernel without one of them is refused, not mis-stamped.
    import inspect

    from benchmark import gemv_timeline
    stamped = gemv_timeline.load_instrumented()
    assert "stamp_ptr" in inspect.signature(stamped._sparse_gemv_kernel.fn).parameters
    source = gemv_timeline.KERNELS.read_text()
    for stamp in ("t_start", "t_wait", "t_list", "t_loop", "t_exit"):
        assert gemv_timeline.instrumented_source(source).count(f"{stamp} = tl.extra.cuda.globaltimer()") == 1
    with pytest.raises(RuntimeError, match="no longer has the line"):
        gemv_timeline.instrumented_source(source.replace("count += tl.sum(keep, 0)", "count = count + tl.sum(keep, 0)"))


def test_gemv_timeline_pair_correlation():
    # Three launches' per-SM loop ends: the first two rank the SMs alike (Pearson 0.99), the third the other way round
    # (-1 and -0.99 against them); the median over the three pairs is the middle one, computed here by hand.
    from benchmark.gemv_timeline import median_pair_correlation
    launches = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.1, 2.2, 2.9, 4.1]),
                torch.tensor([4.0, 3.0, 2.0, 1.0])]
    a, b = launches[1] - launches[1].mean(), launches[2] - launches[2].mean()
    middle = float((a * b).sum() / (a.norm() * b.norm()))  # launches 2 and 3
    assert median_pair_correlation(launches) == pytest.approx(middle, abs=1e-3)
    assert median_pair_correlation(launches[:2] * 2) > 0.99


def test_int4_variant_sweep_launches_only_correct_configs():
    # bench_gemv --int4 --variants: every config the sweep generates (two strip widths, K splits, predicated and
    # compact tiles) launches and gives the float64 product of the dequantized weights, at 0 and 0.5, within 1e-5 of
    # the largest output (fp32 inputs; the sums' order differs by config)
    from benchmark.bench_gemv import grouped_variant_configs
    from sparse import GroupQuant, quantize_groupwise
    from sparse_gemv import sparse_gemv_reference
    from sparse_gemv.grouped import grouped_sparse_gemv_triton
    from sparse_gemv.quant import dequantize_grouped
    torch.manual_seed(0)
    quant = GroupQuant(4, 32, True)
    k, groups = 256, [64, 64]
    weight_t, scales, zeros = quantize_groupwise(torch.randn(sum(groups), k) / 16, quant)
    w64 = dequantize_grouped(weight_t, scales, zeros, quant.group_size, torch.float64)
    x = torch.randn(1, k)
    configs = grouped_variant_configs(sum(groups), k, 2, quant.group_size, strips=(32, 64), stages=(1,),
                                      compact_stages=(1,), warps=(1,), max_waves=4)
    assert {c["SPLIT_K"] for c in configs} == {1, 2, 4} and {c["COMPACT"] for c in configs} == {False, True}
    assert all(c["BLOCK_K"] == 32 for c in configs if not c["COMPACT"])
    for sparsity in (0.0, 0.5):
        t = float(torch.quantile(x.abs(), sparsity)) if sparsity else 0.0
        thr = torch.full((2,), t)
        ref = sparse_gemv_reference(x.double(), w64, thr.double(), groups)
        for cfg in configs:
            y = grouped_sparse_gemv_triton(x, weight_t, scales, zeros, quant.group_size, thr, groups, cfg["COMPACT"],
                                           config=cfg)
            torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()), msg=str(cfg))
