"""The dense down projection as a decode step computes it: y = W (silu(gate) * up), one token.

Inductor (with GPT-Fast's coordinate-descent tuning, as generate.py runs it) turns a one-token matmul into a
reduction and fuses the SwiGLU product into it, so each output row recomputes silu(gate) * up over all K inputs.
This times that fused form against the same product without the prologue and against the alternatives a
dense model could use, each in a CUDA graph over rotating weight copies (bench_gemv's protocol):

    fused     torch.compile: F.linear(silu(g) * u, W)        (the dense model's form)
    plain     torch.compile: F.linear(h, W), h precomputed   (the GEMV alone)
    kmajor    torch.compile: (silu(g) * u) @ W_t, W_t = [K, N] storage
    cublas    eager F.linear(silu(g) * u, W)                  (two kernels: the product, then cuBLAS)
    teal      eager SwiGLU product, then teal::sparse_gemv at threshold 0 on W_t

    python -m benchmark.bench_mlp_down --out benchmark/results
"""
import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F
import triton

from benchmark.bench_gemv import graph_time_us, rotating_copies
from benchmark.common import copy_bandwidth, write_result
from sparse_gemv import sparse_gemv

SHAPES = (("8b down", 14336, 4096), ("70b/tp2 down", 14336, 8192), ("70b/tp4 down", 7168, 8192))


def bench(name, k, n, dtype, l2):
    copies = rotating_copies(n * k * dtype.itemsize, l2)
    ws = [torch.randn(n, k, dtype=dtype, device="cuda") / math.sqrt(k) for _ in range(copies)]
    wts = [w.t().contiguous() for w in ws]
    g, u = torch.randn(2, 1, k, dtype=dtype, device="cuda")
    h = F.silu(g) * u
    zero = torch.zeros(1, device="cuda")
    fused = torch.compile(lambda a, b, w: F.linear(F.silu(a) * b, w))
    plain = torch.compile(lambda a, w: F.linear(a, w))
    kmajor = torch.compile(lambda a, b, wt: (F.silu(a) * b) @ wt)
    ref = F.linear(h.double(), ws[0].double())
    for what, y in (("fused", fused(g, u, ws[0])), ("kmajor", kmajor(g, u, wts[0])),
                    ("teal", sparse_gemv(F.silu(g) * u, wts[0], zero, [n]))):
        rel = float((y.double() - ref).norm() / ref.norm())
        if rel > 2e-2:
            raise AssertionError(f"{name} {what}: relative error {rel:.2e}")
    row = {"shape": name, "K": k, "N": n, "dtype": str(dtype).replace("torch.", ""), "weight_copies": copies,
           "fused_us": graph_time_us(lambda i: fused(g, u, ws[i]), copies),
           "plain_us": graph_time_us(lambda i: plain(h, ws[i]), copies),
           "kmajor_us": graph_time_us(lambda i: kmajor(g, u, wts[i]), copies),
           "cublas_us": graph_time_us(lambda i: F.linear(F.silu(g) * u, ws[i]), copies),
           "teal_us": graph_time_us(lambda i: sparse_gemv(F.silu(g) * u, wts[i], zero, [n]), copies)}
    print(" ".join(f"{k_}={v:.1f}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp_down.py measures GPU kernels and needs CUDA")
    torch._inductor.config.coordinate_descent_tuning = True  # as generate.py and GPT-Fast run inductor
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows = [bench(name, k, n, getattr(torch, a.dtype), l2) for name, k, n in SHAPES]
    result = {"device": props.name, "copy_GBps": copy_bandwidth(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"mlp-down-{props.name.replace(' ', '-')}.json"
    write_result(result, path, plot)
    print(f"wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = ("fused", "plain", "kmajor", "cublas", "teal")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(result["rows"]))], [r[f"{m}_us"] for r in result["rows"]], width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(result["rows"]))], [r["shape"] for r in result["rows"]])
    ax.set_ylabel("us per call")
    ax.set_title(f"dense down projection with its SwiGLU input, {result['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
