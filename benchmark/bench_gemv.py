"""Sparse GEMV against cuBLAS and torch.compile, one token, at the decode shapes of Llama-3-8B and
Llama-3-70B (sliced for TP2 and TP4).

Every method is captured in a CUDA graph that walks over enough rotating weight copies (at least 8,
and together at least 4x the L2 size) that no call finds its weights in L2; time = graph replay / copies,
median of many replays. The device's copy bandwidth is measured in the same run.

    python -m benchmark.bench_gemv --dtypes bfloat16 float16 --out benchmark/results
    python -m benchmark.bench_gemv --variants     # the kernel design space: every variant at fixed configs

Each sparsity is timed with both kernel variants at the configs pick_config chooses: predicated
(sparse_us, the default) and compact (compact_us, kept rows listed first); and, as the compiled decode step
runs o and down, the predicated kernel returning its split-K partial sums (partials_us, teal::sparse_gemv_partials,
with partials_splits of them), whose adding up is left to the kernel that reads them.

    python -m benchmark.bench_gemv --int8 --dtypes bfloat16     # int8 weights (per-output-channel scales)

With --int8 the weights are int8 (weight-only quantization, one fp32 scale per output column) and the activations
--dtypes; the baselines are cuBLAS on the unquantized weights and torch.compile of GPT-Fast's int8 linear
(F.linear(x, W_int8.to(x.dtype)) * scales). Written to gemv-int8-<device>.json.

    python -m benchmark.bench_gemv --int4 --dtypes bfloat16 --sparsities 0 0.5 0.8   # 4-bit, groups of 128

With --int4 the weights are group-wise 4-bit (sparse_gemv/grouped.py; --group_size, --no-zero_point), the baseline
cuBLAS on the unquantized weights; kept bytes count the scales (and zeros) of the groups read. Written to
gemv-int4-g<group size>-<device>.json.

--variants times explicit kernel configurations instead: predicated loads vs kept-row lists
(COMPACT), software-pipelining depth (STAGES), tile, K split and warps, at 0, 50 and 80% sparsity on
the Llama-3-8B shapes; it writes gemv-variants-<device>.json (the evidence behind pick_config). With --partials the
launches return their split-K partial sums instead of reducing them (as the compiled decode step's q/k/v, o and down
do), written to gemv-variants-partials-<device>.json; --sparsities and --shapes narrow either sweep. With --int4 it
times the group-wise kernel's one-token configurations (strip width from --tiles' BLOCK_N, K split, warps, stages;
predicated tiles of one group, compact ones of up to 64 kept rows), written to gemv-variants-int4-g<group size>-....
"""
import argparse
import datetime
import math
import socket
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmark.common import copy_bandwidth, write_result
from cli import add_int4_args, int4_quant
from sparse import GroupQuant, quantize_groupwise, quantize_int8
from sparse_gemv import kernels, sparse_gemv, sparse_gemv_partials, sparse_gemv_reference
from sparse_gemv.grouped import grouped_sparse_gemv_triton
from sparse_gemv.kernels import sparse_gemv_triton
from sparse_gemv.quant import dequantize_grouped

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)


def shapes():
    """(name, K, [group output sizes]): the weight is [sum(groups), K], input channels K."""
    out = [("8b qkv", 4096, [4096, 1024, 1024]), ("8b o", 4096, [4096]), ("8b gate/up", 4096, [14336, 14336]),
           ("8b down", 14336, [4096]), ("14336x4096", 4096, [14336]), ("4096x14336", 14336, [4096])]
    for tp in (2, 4):
        out += [(f"70b/tp{tp} qkv", 8192, [8192 // tp, 1024 // tp, 1024 // tp]), (f"70b/tp{tp} o", 8192 // tp, [8192]),
                (f"70b/tp{tp} gate/up", 8192, [28672 // tp] * 2), (f"70b/tp{tp} down", 28672 // tp, [8192])]
    return out


def capture_rotating_graph(fn, copies: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn(0), ..., fn(copies - 1): the calls over rotating weights, warmed up first (autotuning and
    compilation happen outside the graph, then once on a side stream as capture requires)."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    return g


def graph_time_us(fn, copies: int, replays: int = 30) -> float:
    """Median time of one call, from CUDA-graph replays of `copies` calls over rotating weights."""
    g = capture_rotating_graph(fn, copies)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return sorted(times)[len(times) // 2]


def rotating_copies(weight_bytes: int, l2_bytes: int) -> int:
    """Enough weight copies (at least 8, together 4x the L2) that no call finds its weights in L2."""
    return max(8, math.ceil(4 * l2_bytes / weight_bytes))


def grouped_bytes(n: int, k: int, quant: GroupQuant) -> float:
    """Bytes of a group-wise 4-bit [K, N] weight: its nibbles and the groups' fp16 scales (and zeros)."""
    return n * k / 2 + n * math.ceil(k / quant.group_size) * (4 if quant.zero_point else 2)


def one_token_problem(k: int, n: int, dtype, l2_bytes: int, weight_itemsize: int | None = None):
    """Rotating copies of a random [K, N] weight in the kernel's layout (rotating_copies of them, for weights stored
    at weight_itemsize bytes each, by default dtype's) and one input row."""
    copies = rotating_copies(n * k * (weight_itemsize or dtype.itemsize), l2_bytes)
    weights_t = [torch.randn(k, n, dtype=dtype, device="cuda") / math.sqrt(k) for _ in range(copies)]
    return weights_t, torch.randn(1, k, dtype=dtype, device="cuda")


def int8_copies(weights_t: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same weights quantized: int8 [K, N] copies and their per-column scales."""
    quantized = [quantize_int8(w.t()) for w in weights_t]
    return [q.t().contiguous() for q, _ in quantized], [sc for _, sc in quantized]


def threshold_for(x: torch.Tensor, sparsity: float, groups) -> torch.Tensor:
    """One per-tensor threshold per group that masks `sparsity` of x."""
    t = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0
    return torch.full((len(groups),), t, dtype=torch.float32, device=x.device)


def threshold_and_reference(x: torch.Tensor, weight_t: torch.Tensor, sparsity: float, groups, scales=None):
    """threshold_for's thresholds and the float64 masked product they give, which every timed result is checked against
    (scales: the per-column scales of int8 weights)."""
    thr = threshold_for(x, sparsity, groups)
    return thr, sparse_gemv_reference(x.double(), weight_t.double(), thr.double(), groups,
                                      scales=None if scales is None else scales.double())


def check_result(y: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Relative error against the float64 reference; a timing of a wrong result is an error, not a row."""
    rel = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    if rel > 2e-2:
        raise AssertionError(f"{what}: relative error {rel:.2e} against the float64 reference")
    return rel


def bench_shape(name, k, groups, dtype, l2_bytes, sparsities=SPARSITIES, int8=False, int4: GroupQuant | None = None):
    n = sum(groups)
    if int4 is not None:
        bytes_ = grouped_bytes(n, k, int4)
    else:
        bytes_ = n * k * (1 if int8 else dtype.itemsize)
    copies = rotating_copies(bytes_, l2_bytes)
    weights = [torch.randn(n, k, dtype=dtype, device="cuda") / math.sqrt(k) for _ in range(copies)]
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    out_cublas = graph_time_us(lambda i: F.linear(x, weights[i]), copies)
    quant = [()] * copies  # group-wise formats: (zeros, group_size), the op's arguments after the scales
    if int4 is not None:
        quantized = [quantize_groupwise(w, int4) for w in weights]
        weights_t = [q for q, _, _ in quantized]
        scales = [sc for _, sc, _ in quantized]
        quant = [(z, int4.group_size) for _, _, z in quantized]
        out_compiled = None  # no int4 baseline: cuBLAS on the unquantized weights only
    elif int8:
        quantized = [quantize_int8(w) for w in weights]
        weights_t = [q.t().contiguous() for q, _ in quantized]
        scales = [sc for _, sc in quantized]
        compiled = torch.compile(lambda a, q, sc: F.linear(a, q.to(a.dtype)) * sc.to(a.dtype))  # GPT-Fast's int8 linear
        out_compiled = graph_time_us(lambda i: compiled(x, *quantized[i]), copies)
    else:
        weights_t = [w.t().contiguous() for w in weights]
        scales = [None] * copies
        compiled = torch.compile(lambda a, w: F.linear(a, w))
        out_compiled = graph_time_us(lambda i: compiled(x, weights[i]), copies)
    del weights
    rows = []
    for s in sparsities:
        if int4 is not None:
            thr = threshold_for(x, s, groups)
            w64 = dequantize_grouped(weights_t[0], scales[0], *quant[0], torch.float64)
            ref = sparse_gemv_reference(x.double(), w64, thr.double(), groups)
        else:
            thr, ref = threshold_and_reference(x, weights_t[0], s, groups, scales[0])
        for compact in (False, True):
            rel = check_result(sparse_gemv(x, weights_t[0], thr, groups, compact, scales[0], *quant[0]), ref,
                               f"{name} {dtype} s={s} compact={compact}")
        partials = sparse_gemv_partials(x, weights_t[0], thr, groups, False, scales[0], *quant[0])
        check_result(partials.sum(0), ref, f"{name} {dtype} s={s} partials")
        us = graph_time_us(lambda i: sparse_gemv(x, weights_t[i], thr, groups, False, scales[i], *quant[i]), copies)
        compact_us = graph_time_us(lambda i: sparse_gemv(x, weights_t[i], thr, groups, True, scales[i], *quant[i]),
                                   copies)
        partials_us = graph_time_us(lambda i: sparse_gemv_partials(x, weights_t[i], thr, groups, False, scales[i],
                                                                   *quant[i]), copies)
        kept = float((x.abs() > float(thr[0])).float().mean())
        weights_name = (f"int4-g{int4.group_size}" + ("" if int4.zero_point else "-sym") if int4 is not None
                        else "int8" if int8 else str(dtype).replace("torch.", ""))
        rows.append({"shape": name, "N": n, "K": k, "groups": groups, "dtype": str(dtype).replace("torch.", ""),
                     "weights": weights_name,
                     "sparsity": s, "kept_fraction": kept, "sparse_us": us, "compact_us": compact_us,
                     "partials_us": partials_us, "partials_splits": partials.shape[0], "cublas_us": out_cublas,
                     "compiled_us": out_compiled, "rel_err": rel,
                     "kept_GBps": kept * bytes_ / (us * 1e-6) / 1e9,
                     "compact_kept_GBps": kept * bytes_ / (compact_us * 1e-6) / 1e9, "weight_copies": copies})
        print(f"{name:18s} {rows[-1]['dtype']:9s} {rows[-1]['weights']:9s} s={s:.2f} sparse {us:7.2f} us  compact {compact_us:7.2f}  "
              f"partials {partials_us:7.2f}  cublas {out_cublas:7.2f}  "
              f"compiled {out_compiled or float('nan'):7.2f}  kept-bytes {rows[-1]['kept_GBps']:7.0f} / compact "
              f"{rows[-1]['compact_kept_GBps']:7.0f} GB/s", flush=True)
    return rows


TILES = ((64, 128), (128, 64), (32, 256))


def variant_configs(n: int, k: int, sms: int, tiles=TILES, stages=(1, 3), compact_stages=(2, 3), warps=(4, 8),
                    max_waves: int = 8, block_t=(1,)) -> list[dict]:
    """Explicit configs around the useful region: grids of one to max_waves waves of programs."""
    out = []
    for bn, bk in tiles:
        for split in (1, 2, 4, 8, 16, 32):
            programs = triton.cdiv(n, bn) * split
            if k // split < bk or not sms <= programs <= max_waves * sms:
                continue
            for w in warps:
                for compact, st in [(False, s) for s in stages] + [(True, s) for s in compact_stages]:
                    for bt in block_t:
                        out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "COMPACT": compact,
                                    "STAGES": st, "num_warps": w, "BLOCK_T": bt})
    return out


def bench_variants(name, k, groups, dtype, l2_bytes, sms, sparsities=(0.0, 0.5, 0.8), int8=False, partials=False,
                   **space):
    n = sum(groups)
    itemsize = 1 if int8 else dtype.itemsize  # bytes per stored weight
    weights_t, x = one_token_problem(k, n, dtype, l2_bytes, itemsize)
    scales = [None] * len(weights_t)
    if int8:
        weights_t, scales = int8_copies(weights_t)
    rows = []
    for s in sparsities:
        thr, ref = threshold_and_reference(x, weights_t[0], s, groups, scales[0])
        for cfg in variant_configs(n, k, sms, **space):
            # partials: the split-K partial sums are the output (reduce=False), as compiled q/k/v, o and down leave them
            y = sparse_gemv_triton(x, weights_t[0], thr, groups, config=cfg, scales=scales[0], reduce=not partials)
            check_result(y.sum(0) if partials else y, ref, f"{name} s={s} {cfg}")
            us = graph_time_us(lambda i: sparse_gemv_triton(x, weights_t[i], thr, groups, config=cfg, scales=scales[i],
                                                            reduce=not partials), len(weights_t), replays=10)
            rows.append({"shape": name, "N": n, "K": k, "sparsity": s, "weights": "int8" if int8 else str(dtype).replace("torch.", ""),
                         "partials": partials, "us": us, **cfg})
        for compact in (False, True):
            b = min((r for r in rows if r["sparsity"] == s and r["COMPACT"] == compact), key=lambda r: r["us"])
            print(f"{name:12s} s={s:.2f} best {'compact   ' if compact else 'predicated'} {b['us']:7.2f} us "
                  f"({(1 - s) * n * k * itemsize / (b['us'] * 1e-6) / 1e9:5.0f} GB/s kept) {b}",
                  flush=True)
    return rows


GROUPED_STRIPS = (128, 256, 512)


def grouped_variant_configs(n: int, k: int, sms: int, group_size: int, strips=GROUPED_STRIPS, stages=(1, 3),
                            compact_stages=(2, 3), warps=(4, 8), max_waves: int = 8) -> list[dict]:
    """The group-wise kernel's one-token configs: strips of `strips` columns, K splits that keep two groups a split,
    grids of one to max_waves waves; predicated tiles are one group, compact ones up to 64 kept rows."""
    out = []
    for bn in strips:
        for split in (1, 2, 4, 8, 16, 32):
            programs = triton.cdiv(n, bn) * split
            if k // split < 2 * group_size or not sms <= programs <= max_waves * sms:
                continue
            for w in warps:
                for compact, st in [(False, s) for s in stages] + [(True, s) for s in compact_stages]:
                    out.append({"BLOCK_N": bn, "BLOCK_K": min(64, group_size) if compact else group_size,
                                "SPLIT_K": split, "COMPACT": compact, "STAGES": st, "num_warps": w, "BLOCK_T": 1})
    return out


def bench_grouped_variants(name, k, groups, dtype, int4: GroupQuant, l2_bytes, sms, sparsities=(0.0, 0.5, 0.8),
                           **space):
    """bench_variants for 4-bit weights: each grouped_variant_configs config at each sparsity, checked against the
    float64 product of the dequantized weights, timed over rotating copies."""
    n = sum(groups)
    bytes_ = grouped_bytes(n, k, int4)
    copies = rotating_copies(bytes_, l2_bytes)
    quantized = [quantize_groupwise(torch.randn(n, k, dtype=dtype, device="cuda") / math.sqrt(k), int4)
                 for _ in range(copies)]
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    w64 = dequantize_grouped(quantized[0][0], quantized[0][1], quantized[0][2], int4.group_size, torch.float64)
    rows = []
    for s in sparsities:
        thr = threshold_for(x, s, groups)
        ref = sparse_gemv_reference(x.double(), w64, thr.double(), groups)
        kept = float((x.abs() > float(thr[0])).float().mean())
        for cfg in grouped_variant_configs(n, k, sms, int4.group_size, **space):
            def call(i, cfg=cfg):
                w, sc, z = quantized[i]
                return grouped_sparse_gemv_triton(x, w, sc, z, int4.group_size, thr, groups, cfg["COMPACT"],
                                                  config=cfg)
            check_result(call(0), ref, f"{name} s={s} {cfg}")
            us = graph_time_us(call, copies, replays=10)
            rows.append({"shape": name, "N": n, "K": k, "sparsity": s, "weights": f"int4-g{int4.group_size}"
                         + ("" if int4.zero_point else "-sym"), "partials": False, "us": us,
                         "kept_GBps": kept * bytes_ / (us * 1e-6) / 1e9, **cfg})
        for compact in (False, True):
            b = min((r for r in rows if r["sparsity"] == s and r["COMPACT"] == compact), key=lambda r: r["us"])
            print(f"{name:12s} s={s:.2f} best {'compact   ' if compact else 'predicated'} {b['us']:7.2f} us "
                  f"({b['kept_GBps']:5.0f} GB/s kept) {b}", flush=True)
    return rows


def shape_panels(names, draw, title: str, path: Path) -> None:
    """A PNG with one panel per shape, four to a row: draw(ax, name) fills each panel against sparsity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols, rows = 4, math.ceil(len(names) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        draw(ax, name)
        ax.set_xlabel("sparsity")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(result: dict, path: Path) -> None:
    names = sorted({r["shape"] for r in result["rows"]}, key=[s[0] for s in shapes()].index)
    dtypes = sorted({r["dtype"] for r in result["rows"]})

    def draw(ax, name):
        for dt in dtypes:
            rows = [r for r in result["rows"] if r["shape"] == name and r["dtype"] == dt]
            ax.plot([r["sparsity"] for r in rows], [r["sparse_us"] for r in rows], "o-", label=f"predicated {dt}")
            ax.plot([r["sparsity"] for r in rows], [r["compact_us"] for r in rows], "x:", label=f"compact {dt}")
            ax.plot([r["sparsity"] for r in rows], [r["partials_us"] for r in rows], "+--", label=f"partials {dt}")
        rows = [r for r in result["rows"] if r["shape"] == name and r["dtype"] == dtypes[0]]
        s = [r["sparsity"] for r in rows]
        weights = rows[0].get("weights", "")
        quantized = weights.startswith("int")
        ax.axhline(rows[0]["cublas_us"], color="gray", ls="--", label="cuBLAS" + (" (unquantized)" if quantized else ""))
        if rows[0]["compiled_us"] is not None:
            ax.axhline(rows[0]["compiled_us"], color="black", ls=":", label="torch.compile" + (" int8" if quantized else ""))
        per_weight = 0.5 if weights.startswith("int4") else 1 if quantized else 2  # scales left out
        ideal = [(1 - x) * rows[0]["N"] * rows[0]["K"] * per_weight / (result["copy_GBps"] * 1e9) * 1e6 for x in s]
        ax.plot(s, ideal, color="green", ls="-.", label="(1-s) bytes / copy BW")
        ax.set_title(f"{name} (N={rows[0]['N']}, K={rows[0]['K']})", fontsize=9)
        ax.set_ylabel("us")

    shape_panels(names, draw, f"sparse GEMV, one token, {result['device']}", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--shapes", nargs="*", help="subset of shape names")
    p.add_argument("--variants", action="store_true", help="time the kernel's design space at fixed configs")
    p.add_argument("--int8", action="store_true", help="int8 weights with per-output-column scales")
    add_int4_args(p)
    p.add_argument("--tiles", nargs="+", help="--variants: BLOCK_NxBLOCK_K tiles, e.g. 64x128")
    p.add_argument("--stages", nargs="+", type=int, help="--variants: pipeline depths of the predicated variant")
    p.add_argument("--compact_stages", nargs="+", type=int, help="--variants: pipeline depths of the compact variant")
    p.add_argument("--warps", nargs="+", type=int, help="--variants: warps per program")
    p.add_argument("--max_waves", type=int, help="--variants: largest grid, in programs per SM")
    p.add_argument("--block_t", nargs="+", type=int, help="--variants: 1 (elementwise products) and/or 16 (tensor cores)")
    p.add_argument("--partials", action="store_true", help="--variants: return the split-K partial sums (no reduction)")
    p.add_argument("--sparsities", nargs="+", type=float, help="subset of sparsities (--variants: default 0, 0.5, 0.8)")
    p.add_argument("--tag", default="", help="suffix of the output name, so a new sweep keeps the old file")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch of the sparse kernel (Hopper+), as the decode step uses it")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    int4 = int4_quant(a)
    if a.variants and int4 is not None and (a.partials or a.block_t or a.int8):
        raise SystemExit("--variants --int4 times the group-wise kernel's one-token configurations: no --partials, "
                         "--block_t or --int8")
    kernels.PDL = a.pdl
    space = {key: getattr(a, key) for key in ("stages", "compact_stages", "warps", "max_waves", "block_t") if getattr(a, key)}
    sweep = {"sparsities": tuple(a.sparsities)} if a.sparsities else {}
    if a.tiles:
        space["tiles"] = [tuple(int(v) for v in t.split("x")) for t in a.tiles]
    if int4 is not None and a.variants:  # the group-wise kernel's tiles are a strip of BLOCK_N columns by a group
        space = {key: space[key] for key in ("stages", "compact_stages", "warps", "max_waves") if key in space}
        if a.tiles:
            space["strips"] = sorted({int(t.split("x")[0]) for t in a.tiles})
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv.py measures GPU kernels and needs CUDA")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    print(f"{props.name}: copy bandwidth {bw:.0f} GB/s, L2 {l2 >> 20} MiB", flush=True)
    rows = []
    device = props.name.replace(" ", "-")
    kind = (("-variants" if a.variants else "") + ("-partials" if a.partials else "") + ("-int8" if a.int8 else "")
            + (f"-int4-g{a.group_size}" + ("" if a.zero_point else "-sym") if a.int4 else ""))
    path = a.out / f"gemv{kind}{a.tag}-{device}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    for dt in a.dtypes:
        for name, k, groups in shapes():
            if a.shapes and name not in a.shapes or a.variants and not a.shapes and not name.startswith("8b"):
                continue
            if a.variants and int4 is not None:
                rows += bench_grouped_variants(name, k, groups, getattr(torch, dt), int4, l2,
                                               props.multi_processor_count, **space, **sweep)
            elif a.variants:
                rows += bench_variants(name, k, groups, getattr(torch, dt), l2, props.multi_processor_count, int8=a.int8,
                                       partials=a.partials, **space, **sweep)
            else:
                rows += bench_shape(name, k, groups, getattr(torch, dt), l2, int8=a.int8, int4=int4, **sweep)
            # written after every shape, so a run cut short still leaves what it measured
            result = {"device": props.name, "copy_GBps": bw, "l2_bytes": l2, "torch": torch.__version__,
                      "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "host": socket.gethostname(), "pdl": a.pdl, "command": "python " + " ".join(sys.argv), "tokens": 1, "rows": rows}
            write_result(result, path)
    if not a.variants:
        plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
