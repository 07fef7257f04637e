"""Registers, spills and shared memory of the sparse GEMV as compiled for each decode shape, and its time, with and
without the fused RMSNorm: how many programs fit on one SM decides whether a grid runs in one wave.

    python -m benchmark.gemv_resources --tag=-norm --out benchmark/results

Writes benchmark/results/gemv-resources<tag>-<device>.json: rows {shape, N, K, sparsity, norm, BLOCK_N, BLOCK_K,
SPLIT_K, programs, regs, spills, shared, programs_per_sm, us} (bf16, one token, pick_config's predicated choice, timed
as bench_gemv times it: CUDA graphs over rotating weight copies).
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import triton

from benchmark.bench_gemv import graph_time_us, rotating_copies, threshold_for
from sparse_gemv import kernels

SHAPES = (("8b qkv", 4096, [4096, 1024, 1024]), ("8b gate/up", 4096, [14336, 14336]),
          ("70b/tp2 qkv", 8192, [4096, 512, 512]), ("70b/tp2 gate/up", 8192, [14336, 14336]))


def compiled_kernel():
    """The one kernel compiled since the cache was last cleared."""
    found = [k for cache in kernels._sparse_gemv_kernel.device_caches.values() for k in cache[0].values()]
    assert len(found) == 1, f"expected one compiled kernel, found {len(found)}"
    return found[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    regs_per_sm, smem_per_sm = 65536, props.shared_memory_per_multiprocessor
    rows = []
    for name, k, groups in SHAPES:
        n = sum(groups)
        copies = rotating_copies(n * k * 2, props.L2_cache_size)
        weights_t = [torch.randn(k, n, dtype=torch.bfloat16, device="cuda") / math.sqrt(k) for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        norm = torch.rand(k, device="cuda") + 0.5
        config = kernels.pick_config(k, groups, False, props.multi_processor_count)
        for s in a.sparsities:
            thr = threshold_for(x, s, groups)
            for use_norm in (False, True):
                nw = norm if use_norm else None
                kernels._sparse_gemv_kernel.device_caches.clear()
                kernels.sparse_gemv_triton(x, weights_t[0], thr, groups, norm_weight=nw)
                kern = compiled_kernel()
                threads = 32 * kern.metadata.num_warps
                fit = min(regs_per_sm // (kern.n_regs * threads), smem_per_sm // max(kern.metadata.shared, 1), 32)
                us = graph_time_us(lambda i: kernels.sparse_gemv_triton(x, weights_t[i], thr, groups, norm_weight=nw),
                                   copies)
                rows.append({"shape": name, "N": n, "K": k, "sparsity": s, "norm": use_norm,
                             **{key: config[key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K")},
                             "programs": sum(triton.cdiv(g, config["BLOCK_N"]) for g in groups) * config["SPLIT_K"],
                             "regs": kern.n_regs, "spills": kern.n_spills, "shared": kern.metadata.shared,
                             "programs_per_sm": fit, "us": us})
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"gemv-resources{a.tag}-{props.name.replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
