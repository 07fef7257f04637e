"""Triton sparse GEMV under TRITON_INTERPRET=1 against the float64 masked dense product."""
import math

import pytest
import torch

from sparse_gemv import sparse_gemv, sparse_gemv_reference
from sparse_gemv.kernels import sparse_gemv_triton
from sparse import quantize_int8
from sparse_gemv.kernels import int8_quad_loads, paired_bf16_loads

# Relative Frobenius error: fp32 accumulation; bf16 inputs round to 8 bits, fp16 to 11.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# Both kernel variants (walk every row with predicated loads; list kept rows, then load only those),
# with and without the split-K reduction.
VARIANTS = [{"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split, "COMPACT": compact, "STAGES": 1}
            for compact in (False, True) for split in (1, 3)]


def random_problem(seed, tokens, k, groups, dtype):
    """x [tokens, K] and w [K, N] drawn from a seeded generator, which is returned for further draws."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    w = torch.randn(k, sum(groups), generator=g).to(dtype)
    return x, w, g


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def poisoned_run(x, w, thr, groups, config=None):
    # Output filled with NaN first: any element the kernel fails to write fails the comparison.
    out = torch.full((x.shape[0], w.shape[1]), float("nan"), dtype=x.dtype)
    return sparse_gemv_triton(x, w, thr, groups, out=out, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.parametrize("k,groups", [(37, [50]), (130, [96, 33, 33]), (257, [70, 70])])
@pytest.mark.parametrize("masked", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_per_tensor(dtype, tokens, k, groups, masked, variant):
    x, w, _ = random_problem(k * 10 + tokens, tokens, k, groups, dtype)
    level = float(x.abs().float().quantile(masked)) if 0 < masked < 1 else (0.0 if masked == 0 else float("inf"))
    thr = torch.full((len(groups),), level)
    y = poisoned_run(x, w, thr, groups, VARIANTS[variant])
    assert torch.isfinite(y).all()
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    if masked == 1.0:
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_per_channel_and_fused_qkv_with_three_thresholds(dtype, tokens, variant):
    k, groups = 150, [64, 32, 32]
    x, w, g = random_problem(tokens, tokens, k, groups, dtype)
    for thr in (torch.tensor([0.2, 0.8, 1.5]), torch.rand(3, k, generator=g) * 1.5):
        y = poisoned_run(x, w, thr, groups, VARIANTS[variant])
        ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
        assert rel_err(y, ref) < TOL[dtype]
    # the three groups really use different thresholds: q with threshold 0 equals the dense product
    thr = torch.tensor([0.0, 1e9, 1e9])
    y = sparse_gemv_triton(x, w, thr, groups, config=VARIANTS[variant])
    assert torch.allclose(y[:, :64].double(), x.double() @ w[:, :64].double(), rtol=TOL[dtype], atol=TOL[dtype] * 10)
    assert torch.equal(y[:, 64:], torch.zeros_like(y[:, 64:]))


def test_bf16_pairs_widen_exactly_as_the_conversion():
    # One bf16 token reads a 4-byte aligned weight as int32 pairs, widened by a shift and a mask; the same weight
    # one element off that alignment takes the plain conversion. Same products in the same order: equal bits.
    k, groups = 200, [64, 30, 34]
    x, w, _ = random_problem(11, 1, k, groups, torch.bfloat16)
    misaligned = torch.empty(k * sum(groups) + 1, dtype=torch.bfloat16)[1:].view(k, sum(groups))
    misaligned.copy_(w)
    assert paired_bf16_loads(w, groups) and not paired_bf16_loads(misaligned, groups)
    assert not paired_bf16_loads(w, [63, 31, 34]) and not paired_bf16_loads(w.half(), groups)
    thr = torch.tensor([0.3, 0.6, 0.9])
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    for config in VARIANTS:
        y = poisoned_run(x, w, thr, groups, config)
        assert torch.equal(y, poisoned_run(x, misaligned, thr, groups, config))
        assert rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_one_token_through_the_tensor_core_path(dtype, compact):
    # BLOCK_T=16 runs a single token through tl.dot (rows 1-15 padding), the path design sweeps compare.
    k, groups = 130, [64, 40]
    x, w, _ = random_problem(3, 1, k, groups, dtype)
    thr = torch.tensor([0.5, 1.0])
    config = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "COMPACT": compact, "STAGES": 1, "BLOCK_T": 16}
    y = poisoned_run(x, w, thr, groups, config)
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    assert rel_err(y, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="fewer than"):
        sparse_gemv_triton(x.expand(2, k).contiguous(), w, thr, groups, config={**config, "BLOCK_T": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_partial_sums_are_the_masked_products_of_each_k_slice(dtype, tokens, variant):
    # reduce=False returns fp32 [SPLIT_K, T, N]: slice s must be the masked product over the K rows that split s
    # covers (ceil(K / SPLIT_K) rounded up to whole BLOCK_K tiles), checked slice by slice against float64.
    k, groups = 300, [40, 24, 24]
    x, w, _ = random_problem(tokens + 50, tokens, k, groups, dtype)
    thr = torch.tensor([0.4, 0.7, 1.0])
    config = VARIANTS[variant]
    parts = sparse_gemv_triton(x, w, thr, groups, config=config, reduce=False)
    split, bk = config["SPLIT_K"], config["BLOCK_K"]
    assert parts.dtype == torch.float32 and parts.shape == (split, tokens, sum(groups))
    per_split = math.ceil(math.ceil(k / split) / bk) * bk
    for s in range(split):
        rows = slice(s * per_split, min((s + 1) * per_split, k))
        ref = sparse_gemv_reference(x[:, rows].double(), w[rows].double(), thr.double(), groups)
        assert rel_err(parts[s], ref) < TOL[dtype]
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), groups)
    assert rel_err(parts.sum(0), ref) < TOL[dtype]
    with pytest.raises(ValueError, match="partial sums are the output"):
        sparse_gemv_triton(x, w, thr, groups, config=config, reduce=False, out=torch.empty(tokens, 88, dtype=dtype))


def test_partials_op_on_cpu_and_under_torch_compile():
    x, w = torch.randn(2, 64), torch.randn(64, 48)
    thr = torch.tensor([0.5, 1.0])
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), [24, 24])
    parts = torch.ops.teal.sparse_gemv_partials(x, w, thr, [24, 24])
    assert parts.shape == (1, 2, 48) and parts.dtype == torch.float32  # the reference path: one partial
    assert torch.allclose(parts[0].double(), ref, atol=1e-4)
    bf = torch.ops.teal.sparse_gemv_partials(x.bfloat16(), w.bfloat16(), thr, [24, 24])
    assert bf.dtype == torch.float32  # not rounded to bf16: whoever adds the partials rounds once
    assert rel_err(bf[0], sparse_gemv_reference(x.bfloat16().double(), w.bfloat16().double(), thr.double(), [24, 24])) < 1e-6
    f = torch.compile(lambda a, t: torch.ops.teal.sparse_gemv_partials(a, w, t, [24, 24]).sum(0), fullgraph=True)
    assert torch.allclose(f(x, thr).double(), ref, atol=1e-4)
    torch.library.opcheck(torch.ops.teal.sparse_gemv_partials.default, (x, w, thr, [24, 24]))


def test_dense_path_compares_thresholds_in_float32():
    # 9 tokens take the op's dense path. The threshold 1.005 rounds to 1.0078125 in bf16, which would
    # wrongly mask x = 1.0078125; compared in float32, as the kernels compare, x is kept.
    x = torch.full((9, 4), 1.0078125, dtype=torch.bfloat16)
    w = torch.ones(4, 2, dtype=torch.bfloat16)
    y = sparse_gemv(x, w, torch.tensor([1.005]), [2])
    assert torch.equal(y, torch.full((9, 2), 4 * 1.0078125, dtype=torch.bfloat16))


def test_bad_inputs_get_clear_errors():
    x, w, thr = torch.randn(1, 8), torch.randn(8, 6), torch.zeros(1)
    with pytest.raises(TypeError, match="x's dtype"):
        sparse_gemv(x.half(), w, thr, [6])
    with pytest.raises(TypeError, match="x must be one of"):
        sparse_gemv(x.int(), w.int(), thr, [6])
    # float64 runs on the CPU (decode-faithfulness checks compare in it), against float64 math
    torch.testing.assert_close(sparse_gemv(x.double(), w.double(), thr, [6]), x.double() @ w.double())
    q, scales = quantize_int8(w.t())
    with pytest.raises(TypeError, match="int8 with scales"):
        sparse_gemv(x, q.t().contiguous(), thr, [6])
    for bad in (scales.half(), scales[:5]):
        with pytest.raises(TypeError, match="scales go with int8 weights"):
            sparse_gemv(x, q.t().contiguous(), thr, [6], scales=bad)
    with pytest.raises(TypeError, match="scales go with int8 weights"):
        sparse_gemv(x, w, thr, [6], scales=scales)
    with pytest.raises(TypeError, match="int8 with scales"):  # the launcher itself checks its inputs as the op does
        sparse_gemv_triton(x, q.t().contiguous(), thr, [6])
    with pytest.raises(TypeError, match="float32"):
        sparse_gemv(x, w, thr.double(), [6])
    with pytest.raises(ValueError, match="weight_t must be"):
        sparse_gemv(x, torch.randn(6, 8), thr, [8])
    with pytest.raises(ValueError, match="contiguous"):
        sparse_gemv(x, torch.randn(6, 8).t(), thr, [6])
    with pytest.raises(ValueError, match="split_sizes"):
        sparse_gemv(x, w, thr, [4])
    with pytest.raises(ValueError, match="thresholds must be"):
        sparse_gemv(x, w, torch.zeros(2), [6])
    with pytest.raises(ValueError, match="tokens, K"):
        sparse_gemv(x[0], w, thr, [6])


def test_custom_op_under_torch_compile_on_cpu():
    x, w = torch.randn(1, 64), torch.randn(64, 48)
    thr = torch.tensor([0.5, 1.0])
    f = torch.compile(lambda a, t: torch.ops.teal.sparse_gemv(a, w, t, [24, 24]), fullgraph=True)
    ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), [24, 24])
    assert torch.allclose(f(x, thr).double(), ref, atol=1e-4)
    torch.library.opcheck(torch.ops.teal.sparse_gemv.default, (x, w, thr, [24, 24]))


def test_pdl_switch_reaches_inductor_and_the_kernel():
    # generate.py --no-pdl must turn programmatic dependent launch off for both kinds of kernel in a decode step.
    import torch._inductor.config as inductor_config

    import generate
    from sparse_gemv import kernels
    before = (inductor_config.triton.enable_pdl, kernels.PDL)
    try:
        generate.set_pdl(False)
        assert (inductor_config.triton.enable_pdl, kernels.PDL) == (False, False)
        generate.set_pdl(True)
        assert (inductor_config.triton.enable_pdl, kernels.PDL) == (True, True)
    finally:
        inductor_config.triton.enable_pdl, kernels.PDL = before


def int8_problem(seed, tokens, k, groups, dtype):
    """x [tokens, K] in dtype; int8 weights [K, N] with their fp32 scales [N]; and the float64 weight they stand for."""
    x, w, g = random_problem(seed, tokens, k, groups, torch.float32)
    q, scales = quantize_int8(w.t())
    return x.to(dtype), q.t().contiguous(), scales, (q.double() * scales.double()[:, None]).t(), g


def test_int8_quantization_rounds_each_weight_to_its_channels_grid():
    w = torch.randn(6, 40) * torch.tensor([0.01, 1, 100, 3, 0.5, 0])[:, None]  # one all-zero channel
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and q.abs().max() <= 127
    assert torch.equal(q.abs().amax(dim=1)[:5], torch.full((5,), 127, dtype=torch.int8))  # each channel's max -> 127
    assert scales[5] == 1 and not q[5].any()
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest on the channel's grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_int8_weights_scaled_per_output_column(dtype, tokens, variant):
    # Reference: the masked input times the dequantized weight (int8 value x its column's scale) in float64; the
    # kernel multiplies int8 rows in fp32 and scales once at the end.
    k, groups = 150, [40, 24, 24]
    x, q, scales, w64, _ = int8_problem(tokens + 7, tokens, k, groups, dtype)
    thr = torch.tensor([0.4, 0.7, 1.0])
    keep = [x.double().abs() > t for t in thr.double()]
    cols = torch.split(w64, groups, dim=1)
    ref = torch.cat([torch.where(m, x.double(), 0) @ c for m, c in zip(keep, cols)], dim=1)
    config = VARIANTS[variant]
    out = torch.full((tokens, sum(groups)), float("nan"), dtype=dtype)
    y = sparse_gemv_triton(x, q, thr, groups, out=out, config=config, scales=scales)
    assert rel_err(y, ref) < TOL[dtype]
    parts = sparse_gemv_triton(x, q, thr, groups, config=config, reduce=False, scales=scales)
    assert parts.shape[0] == config["SPLIT_K"] and rel_err(parts.sum(0), ref) < TOL[dtype]
    tc = sparse_gemv_triton(x, q, thr, groups, config={**config, "BLOCK_T": 16}, scales=scales)  # tensor-core path
    assert rel_err(tc, ref) < TOL[dtype]
    # the op's CPU path (the reference) agrees too
    assert rel_err(sparse_gemv(x, q, thr, groups, scales=scales), ref) < TOL[dtype]


def test_int8_op_under_torch_compile_on_cpu():
    x, q, scales, w64, _ = int8_problem(1, 1, 64, [24, 24], torch.float32)
    thr = torch.tensor([0.5, 1.0])
    ref = torch.cat([torch.where(x.double().abs() > t, x.double(), 0) @ c
                     for t, c in zip(thr.double(), torch.split(w64, [24, 24], dim=1))], dim=1)
    f = torch.compile(lambda a, t: torch.ops.teal.sparse_gemv(a, q, t, [24, 24], False, scales), fullgraph=True)
    assert torch.allclose(f(x, thr).double(), ref, atol=1e-4)
    torch.library.opcheck(torch.ops.teal.sparse_gemv.default, (x, q, thr, [24, 24], False, scales))
    torch.library.opcheck(torch.ops.teal.sparse_gemv_partials.default, (x, q, thr, [24, 24], False, scales))


def test_int8_quads_widen_exactly_as_the_conversion():
    # One token reads a 4-byte aligned int8 weight as int32 words of four, each byte widened through the float 2^23 + b;
    # the same weight one byte off that alignment takes the plain conversion. Same products in the same order: equal.
    k, groups = 200, [64, 32, 36]
    x, q, scales, w64, _ = int8_problem(12, 1, k, groups, torch.bfloat16)
    q[:4, :4] = torch.tensor([[-127, -128, 127, 0], [1, -1, 64, -64], [0, 0, 0, 0], [127, 127, -127, -127]],
                             dtype=torch.int8)  # the ends of the range and both signs in every byte position
    w64 = q.double() * scales.double()
    misaligned = torch.empty(k * sum(groups) + 1, dtype=torch.int8)[1:].view(k, sum(groups))
    misaligned.copy_(q)
    assert int8_quad_loads(q, groups) and not int8_quad_loads(misaligned, groups)
    assert not int8_quad_loads(q, [62, 34, 36]) and not paired_bf16_loads(q, groups)
    thr = torch.tensor([0.3, 0.6, 0.9])
    keep = [x.double().abs() > t for t in thr.double()]
    ref = torch.cat([torch.where(m, x.double(), 0) @ c for m, c in zip(keep, torch.split(w64, groups, dim=1))], dim=1)
    for config in VARIANTS:
        out = torch.full((1, sum(groups)), float("nan"), dtype=torch.bfloat16)
        y = sparse_gemv_triton(x, q, thr, groups, out=out, config=config, scales=scales)
        assert torch.equal(y, sparse_gemv_triton(x, misaligned, thr, groups, config=config, scales=scales))
        assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_every_kernel_launch_builds_for_ampere_and_hopper():
    # The issue asks for kernels that run on Ampere (A100 sm_80, A6000 sm_86) as well as Hopper, with nothing
    # Hopper-only lacking a fallback. No GPU here: tests/compile_launches.py records the launches the real launchers
    # make for each architecture (its SM count, shared memory and PDL support) and builds each through ptxas, which
    # rejects any Hopper-only instruction on sm_80/86. Checked per launch: it builds; its shared memory fits the
    # architecture's per-block limit (fp32 weights with several tokens did not on sm_86 three stages deep: 112 KB
    # against 99 KB); and programmatic dependent launch (griddepcontrol) is in the PTX exactly where the launch uses it,
    # which the launchers do on Hopper only.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_launches.py")
    root = str(script.parent.parent)  # the project's modules, installed or not
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    runs = {cap: subprocess.Popen([sys.executable, str(script), str(cap)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cap in (80, 86, 90)}
    launches = {}
    for cap, run in runs.items():
        out, err = run.communicate(timeout=1800)  # on 2 shared cores a 4-bit persistent build takes about 2 minutes
        assert run.returncode == 0, err[-3000:]
        launches[cap] = [json.loads(line) for line in out.splitlines()]
    failed = [(r["capability"], r["launch"], r["kernel"], r["error"][-500:]) for rows in launches.values() for r in rows
              if not r["ok"]]
    assert not failed, failed
    names = {cap: sorted((r["launch"], r["kernel"]) for r in rows) for cap, rows in launches.items()}
    assert names[80] == names[86] == names[90]
    kernels = {kernel for _, kernel in names[80]}
    assert kernels == {"_sparse_gemv_kernel", "_grouped_sparse_gemv_kernel", "_decode_attention_kernel",
                       "_attention_combine_kernel", "_one_shot_all_reduce_rmsnorm_kernel", "_decode_layers_kernel",
                       "_cats_gate_up_kernel"}
    assert sum(kernel == "_sparse_gemv_kernel" for _, kernel in names[80]) == 72  # 4 shapes x 18 variants
    # 4 shapes x 2 formats x 4 + 4, and 3 LM heads (Q8_0, Q4_1, Q4_0)
    assert sum(kernel == "_grouped_sparse_gemv_kernel" for _, kernel in names[80]) == 39
    assert sum(kernel == "_cats_gate_up_kernel" for _, kernel in names[80]) == 6  # 3 dtypes x 1 or 4 tokens
    for cap, rows in launches.items():
        for r in rows:
            assert r["shared"] <= r["max_shared"], r
            uses_pdl = cap >= 90 and r["kernel"] not in ("_one_shot_all_reduce_rmsnorm_kernel", "_decode_layers_kernel")
            assert r["pdl"] == uses_pdl, r
            assert (r["griddepcontrol"] > 0) == uses_pdl, r


def test_pipeline_depth_is_cut_only_where_the_buffers_would_not_fit():
    # fit_stages bounds the picked pipeline depth by a block's shared memory. On an H100 (227 KB) and an A100
    # (163 KB) the picked configs, measured on the H100, must keep their depth for every weight dtype and token count
    # the launcher pairs them with; on an A6000 (99 KB) fp32 weights three stages deep would not fit and get two.
    from sparse_gemv.kernels import fit_stages, pick_config
    shapes = [(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,)),
              (8192, (8192, 1024, 1024)), (8192, (14336, 14336)), (28672, (8192,)), (14336, (8192,))]
    cut = {}
    for gpu, sms, max_shared in (("H100", 132, 232448), ("A100", 108, 166912), ("A6000", 84, 101376)):
        cut[gpu] = set()
        for k, splits in shapes:
            for compact in (False, True):
                for reduce in (False, True):
                    for int8, pairs in ((False, [(2, 2), (4, 4)]), (True, [(1, 2), (1, 4)])):
                        meta = pick_config(k, splits, compact, sms, reduce, int8)
                        assert meta["STAGES"] == 3
                        for (weight_bytes, x_bytes), block_t in ((p, t) for p in pairs for t in (1, 16)):
                            stages = fit_stages(meta, block_t, weight_bytes, x_bytes, max_shared)
                            per_stage = meta["BLOCK_K"] * (meta["BLOCK_N"] * weight_bytes + block_t * x_bytes + 4)
                            assert stages * per_stage <= max_shared and 1 <= stages <= 3
                            if stages < 3:
                                cut[gpu].add((weight_bytes, stages))
    assert cut == {"H100": set(), "A100": set(), "A6000": {(4, 2)}}
