"""Same-process A/B of group-wise quantized sparse GEMV revisions (sparse_gemv/grouped.py): each given grouped.py is
loaded as its own module and timed, one token, on Llama-3-8B shapes at its own grouped_config choices (predicated and
compact) and, for revisions that take them, at explicit tiles (--tiles BLOCK_NxBLOCK_K, predicated or with a trailing
c for compact, each with today's K split for that width). CUDA graphs over rotating weight copies as in bench_gemv;
every timed config's output is checked first against the float64 product of the dequantized weights.
Kept bytes (nibbles and the fp16 scales and zeros of the kept rows) are reported against the copy bandwidth measured
in the same run. A tile runs the revision's own pipelining depth for that form unless it names one (s1, s3).

    mkdir -p .gpu && git show a108518:sparse_gemv/grouped.py > .gpu/grouped_before.py
    python -m benchmark.ab_grouped before=.gpu/grouped_before.py after=sparse_gemv/grouped.py \\
        --tiles after:512x128s1 after:256x128s3 after:256x32c

Writes benchmark/results/gemv-ab-grouped<tag>-<device>.json (rows {shape, N, K, sparsity, kernels, BLOCK_N, BLOCK_K,
SPLIT_K, COMPACT, STAGES, max_registers, picked, us, kept_GBps, rel_err}) and a PNG of each revision's best time
against sparsity.
"""
import argparse
import datetime
import hashlib
import math
import re
import sys
from pathlib import Path

import torch
import triton

from benchmark.ab_gemv import load_kernels
from benchmark.bench_gemv import (check_result, graph_time_us, grouped_bytes, rotating_copies, shape_panels,
                                  threshold_for)
from benchmark.common import copy_bandwidth, write_result
from sparse import GroupQuant, quantize_groupwise
from sparse_gemv import sparse_gemv_reference
from sparse_gemv.grouped import k_split
from sparse_gemv.quant import dequantize_grouped

SHAPES = {"14336x4096": (4096, [14336]), "4096x14336": (14336, [4096]), "8b gate/up": (4096, [14336, 14336]),
          "8b down": (14336, [4096]), "8b qkv": (4096, [4096, 1024, 1024]), "8b o": (4096, [4096])}
TILE = re.compile(r"(\d+)x(\d+)(?:s(\d+))?(?:r(\d+))?(c?)")  # BLOCK_NxBLOCK_K[sSTAGES][rREGISTERS][c]


def configs(module, label: str, k: int, groups, quant: GroupQuant, sms: int, tiles) -> list[tuple[dict, bool]]:
    """(config, picked): the revision's own picks, then the tiles asked for it (label:BLOCK_NxBLOCK_K[sSTAGES]
    [rREGISTERS][c]; rREGISTERS caps the launch's registers a thread)."""
    picked = [module.pick_grouped_config(k, groups, compact, sms, quant.group_size) for compact in (False, True)]
    out = [(c, True) for c in picked]
    for spec in tiles:
        name, tile = spec.split(":")
        if name != label:
            continue
        bn, bk, stages, registers, compact = TILE.fullmatch(tile).groups()
        compact = compact == "c"
        base = module.pick_grouped_config(k, groups, compact, sms, quant.group_size)
        split = k_split(k, groups, int(bn), sms, quant.group_size)  # today's rule, for every revision's tiles
        out.append(({**base, "BLOCK_N": int(bn), "BLOCK_K": int(bk), "SPLIT_K": split,
                     "STAGES": int(stages) if stages else base["STAGES"],
                     **({"maxnreg": int(registers)} if registers else {})}, False))
    return out


def bench(name, modules, quant, sparsities, l2, sms, tiles) -> list[dict]:
    k, groups = SHAPES[name]
    n = sum(groups)
    bytes_ = grouped_bytes(n, k, quant)
    copies = rotating_copies(bytes_, l2)
    quantized = [quantize_groupwise(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / math.sqrt(k), quant)
                 for _ in range(copies)]
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    w64 = dequantize_grouped(*quantized[0], quant.group_size, torch.float64)
    rows = []
    for s in sparsities:
        thr = threshold_for(x, s, groups)
        ref = sparse_gemv_reference(x.double(), w64, thr.double(), groups)
        kept = float((x.abs() > float(thr[0])).float().mean())
        for label, module in modules.items():
            for cfg, picked in configs(module, label, k, groups, quant, sms, tiles):
                def run(i, cfg=cfg, module=module):
                    q, sc, z = quantized[i]
                    return module.grouped_sparse_gemv_triton(x, q, sc, z, quant.group_size, thr, groups,
                                                             cfg["COMPACT"], config=cfg)
                rel = check_result(run(0), ref, f"{label} {name} s={s} {cfg}")
                us = graph_time_us(run, copies)
                rows.append({"shape": name, "N": n, "K": k, "sparsity": s, "kept_fraction": kept, "kernels": label,
                             **{key: cfg[key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "COMPACT", "STAGES")},
                             "max_registers": cfg.get("maxnreg", 0), "picked": picked, "us": us,
                             "kept_GBps": kept * bytes_ / (us * 1e-6) / 1e9, "rel_err": rel})
                r = rows[-1]
                cap = f" regs {r['max_registers']}" if r["max_registers"] else ""
                print(f"{name:11s} s={s:.2f} {label:7s} {r['BLOCK_N']:4d}x{r['BLOCK_K']:<3d} split {r['SPLIT_K']:2d}"
                      f" stages {r['STAGES']}{cap}"
                      f"{' compact' if r['COMPACT'] else '        '}{' picked' if picked else '       '} "
                      f"{us:7.2f} us  kept {r['kept_GBps']:6.0f} GB/s  rel_err {rel:.1e}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    def draw(ax, name):
        for label in result["kernels"]:
            mine = [r for r in result["rows"] if r["shape"] == name and r["kernels"] == label]
            sparsities = sorted({r["sparsity"] for r in mine})
            ax.plot(sparsities, [min(r["us"] for r in mine if r["sparsity"] == s) for s in sparsities], "o-",
                    label=label)
        ax.set_ylabel("best us")

    names = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    shape_panels(names, draw, f"grouped sparse GEMV revisions, int4, one token, {result['device']}", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", nargs="+", help="LABEL=PATH of a grouped.py revision, two or more")
    p.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x14336"], choices=list(SHAPES))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.8])
    p.add_argument("--tiles", nargs="*", default=[],
                   help="LABEL:BLOCK_NxBLOCK_K, then sSTAGES for a pipelining depth, rREGISTERS for a register cap, "
                        "a trailing c for compact")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--no-zero_point", dest="zero_point", action="store_false")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    pairs = [spec.split("=", 1) for spec in a.kernels]
    if len(pairs) < 2 or any(len(pair) != 2 or not Path(pair[1]).is_file() for pair in pairs):
        raise SystemExit(f"ab_grouped: give two or more LABEL=PATH of existing grouped.py files, got {a.kernels}")
    if any(t.count(":") != 1 or t.split(":")[0] not in dict(pairs) or not TILE.fullmatch(t.split(":")[1])
           for t in a.tiles):
        raise SystemExit(f"ab_grouped: --tiles takes LABEL:BLOCK_NxBLOCK_K[sSTAGES][rREGISTERS][c] with a given label, "
                         f"got {a.tiles}")
    if not torch.cuda.is_available():
        raise SystemExit("ab_grouped.py measures GPU kernels and needs CUDA")
    modules = {label: load_kernels(label, Path(path)) for label, path in pairs}
    quant = GroupQuant(4, a.group_size, a.zero_point)
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "copy_GBps": copy_bandwidth(), "tokens": 1, "weights": f"int4-g{a.group_size}"
              + ("" if a.zero_point else "-sym"),
              "kernels": {label: {"path": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
                          for label, path in pairs}, "rows": []}
    print(f"copy bandwidth {result['copy_GBps']:.0f} GB/s", flush=True)
    path = a.out / f"gemv-ab-grouped{a.tag}-{props.name.replace(' ', '-')}.json"
    for name in a.shapes:
        result["rows"] += bench(name, modules, quant, a.sparsities, getattr(props, "L2_cache_size", 50 << 20),
                                props.multi_processor_count, a.tiles)
        write_result(result, path)  # after every shape, so a cut-short run keeps its rows
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
