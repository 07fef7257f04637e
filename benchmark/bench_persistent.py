"""The persistent decode kernel alone (teal::decode_layers, every decoder layer of one step), across its launch
settings, against the bytes it reads and the copy bandwidth measured in the same run.

    python -m benchmark.bench_persistent --model llama-3-8b --sparsities 0 0.5 --int8
    python -m benchmark.bench_persistent --model llama-3-8b --sparsities 0 0.5 --int4     # 4-bit, groups of 128

Random weights at the named config's shapes, sparse with uniform thresholds from a random-token prefill (as
bench_decode's). Each setting (programs per SM, weight KB per tile, warps, register cap, pipelining stages, rows an
iteration, and for --int4 the strip width) is captured in a CUDA graph of 10 steps and timed by CUDA events, the
median of 20 replays; the weights are read from HBM every step (a step reads far more than L2 holds). Rows hold the
step time, the weight bytes of the kept rows, their share of the copy bandwidth, and the kernel's own phase profile.
Writes JSON and a PNG plot.
"""
import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

from benchmark.bench_decode import calibrate_on_random_prefill, set_uniform
from benchmark.bench_gemv import graph_time_us
from benchmark.common import copy_bandwidth, write_result
from cli import add_int4_args, fraction, int4_quant, non_negative_int, positive_int, user_errors
from generate import persistent_layers
from model import random_model
from sparse import LAYER_GROUPS, sparse_layers, sparsify
from sparse_gemv.persistent import BLOCK_ROWS, GROUPED_STRIP, MAX_REGISTERS, STAGES, _device_limits
from thresholds.file import MAX_SPARSITY


@torch.no_grad()
def kept_bytes(model, token, pos) -> int:
    """Weight bytes one persistent step reads: the rows its inputs keep (counted on the per-layer path's inputs for
    the same token), with group-wise quantized weights' share of scales and zeros; int8 scales and norms aside."""
    counts = {}
    hooks = []
    for i, path, layer in sparse_layers(model):
        def pre(module, args, key=(i, path)):
            x = args[0].reshape(-1).abs().float()
            counts[key] = [int((x > t).sum()) for t in module.thresholds.reshape(len(LAYER_GROUPS[key[1]]), -1)]
        hooks.append(layer.register_forward_pre_hook(pre))
    model(token, pos)
    for h in hooks:
        h.remove()
    total = 0
    for i, path, layer in sparse_layers(model):
        for kept, n in zip(counts[(i, path)], layer.split_sizes):
            total += kept * layer.row_bytes(n)
    return total


def time_steps(layers, args, steps: int = 10, replays: int = 20) -> float:
    """Median seconds per step of `steps` persistent steps captured in one CUDA graph."""
    return graph_time_us(lambda i: layers(*args), steps, replays) / 1e6


@user_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--sparsities", type=fraction(0, MAX_SPARSITY), nargs="+", default=[0.0, 0.5])
    p.add_argument("--int8", action="store_true")
    add_int4_args(p)
    p.add_argument("--programs_per_sm", type=positive_int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--tile_kb", type=positive_int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=positive_int, nargs="+", default=[4])
    p.add_argument("--max_registers", type=non_negative_int, nargs="+", default=[MAX_REGISTERS],
                   help="register cap per thread (0: the compiler's choice)")
    p.add_argument("--grouped_strip", type=int, nargs="+", default=[GROUPED_STRIP], choices=(32, 64, 128, 256, 512),
                   help="columns per GEMV strip of --int4 weights")
    p.add_argument("--stages", type=positive_int, nargs="+", default=[STAGES],
                   help="software-pipelining depth of the GEMV tiles' row loop")
    p.add_argument("--block_rows", type=positive_int, nargs="+", default=[BLOCK_ROWS],
                   help="rows of bf16/int8 weights an iteration of the GEMV tiles' row loop")
    p.add_argument("--cache", type=positive_int, default=205, help="positions in the KV cache (bench_decode's 5 + 200)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    int4 = int4_quant(a)
    if not torch.cuda.is_available():
        raise SystemExit("bench_persistent.py times a GPU kernel and needs CUDA")
    copy_GBps = copy_bandwidth()
    model = sparsify(random_model(a.model, device="cuda"), int8=a.int8, group_quant=int4)
    table = calibrate_on_random_prefill(model, a.sparsities)
    model.setup_caches(1, a.cache, exact=True)
    sms = _device_limits(torch.cuda.current_device())[0]
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([a.cache - 1], dtype=torch.int, device="cuda")
    rows = []
    base = persistent_layers(model)
    for s in a.sparsities:
        set_uniform(model, table[s])
        moved = kept_bytes(model, token, pos)
        for per_sm, tile_kb, warps, regs, strip, stages, block in itertools.product(
                a.programs_per_sm, a.tile_kb, a.warps, a.max_registers, a.grouped_strip, a.stages, a.block_rows):
            layers = base.launched(programs=per_sm * sms, tile_bytes=tile_kb << 10, num_warps=warps,
                                   max_registers=regs, grouped_strip=strip, stages=stages, block_rows=block)
            setting = (f"{s} {per_sm}/SM {tile_kb} KB {warps} warps regs {regs} strip {strip} stages {stages} "
                       f"rows {block}")
            args = (token, pos, model.freqs_cis, model.tok_embeddings.weight, model.k_caches, model.v_caches)
            try:
                step_s = time_steps(layers, args)
            except ValueError as e:  # more programs per SM than fit: the guard's refusal
                print(f"{setting}: {e}", flush=True)
                continue
            layers.check()
            row = {"sparsity": s, "programs_per_sm": per_sm, "tile_kb": tile_kb, "warps": warps,
                   "max_registers": regs, "grouped_strip": strip, "stages": stages, "block_rows": block,
                   "step_ms": 1e3 * step_s,
                   "bytes": moved, "share_of_copy_bandwidth": moved / step_s / (copy_GBps * 1e9),
                   "phases": layers.profile(*args)}
            rows.append(row)
            print(f"{setting}: {row['step_ms']:.3f} ms, {row['share_of_copy_bandwidth']:.2f} of copy", flush=True)
            print(json.dumps(row["phases"]), flush=True)
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "model": a.model, "int8": a.int8,
              "int4": {"group_size": a.group_size, "zero_point": a.zero_point} if a.int4 else None,
              "copy_GBps": copy_GBps, "cache": a.cache,
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    weights = "-int8" if a.int8 else f"-int4-g{a.group_size}{'' if a.zero_point else '-sym'}" if a.int4 else ""
    path = a.out / f"persistent-{a.model}{weights}{a.tag}-{props.name.replace(' ', '-')}.json"
    write_result(result, path, plot)
    print(f"wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in dict.fromkeys(r["sparsity"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["sparsity"] == s]
        ax.plot(range(len(rows)), [r["share_of_copy_bandwidth"] for r in rows], "o-", label=f"sparsity {s}")
        labels = [f"{r['programs_per_sm']}/SM {r['tile_kb']}K w{r['warps']} r{r['max_registers']} s{r['grouped_strip']}"
                  f" p{r['stages']} k{r.get('block_rows', 64)}" for r in rows]  # files before block_rows: 64
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("kept weight bytes / step time / copy bandwidth")
    int4 = result.get("int4")
    weights = " int8" if result["int8"] else f" int4 g{int4['group_size']}" if int4 else ""
    ax.set_title(f"persistent decode kernel, {result['model']}{weights}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
