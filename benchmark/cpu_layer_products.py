"""Where the sparse layers' time goes in a CPU decode step: the layer products alone, on real decode inputs.

    python -m benchmark.cpu_layer_products                     # default SmolLM2 at 0.5 (uniform), 8 tokens, 1 and 2 threads

Captures every sparse layer's input over --tokens greedy decode steps, then replays them layer by layer in the order a
step runs them, after reading a buffer larger than the last-level cache (no pass finds the rows of the one before in
it: a pessimistic cache, the same for every variant), and times each call (wall time; on a shared machine use one
thread and compare within a run):
  dense  torch.mm(x, weight_t), every row (what a dense step's linear reads);
  fused  sparse_gemv.cpu.sparse_gemv_rows, the eager CPU path: the fused kernel (cpu_kernel.cpp);
  bag    sparse_gemv.cpu.sparse_gemv_bags, the embedding_bag path (the fallback, and the path before the kernel);
  index  kept_row_bags alone: the bag path's mask, kept rows, bags' index, starts and weights;
  bags   torch.embedding_bag alone, on bags built beforehand.
Every variant at every --threads count in each round. Figures are medians over rounds and tokens, in ms per decode
step (30 layers of a kind). Writes JSON and a PNG.
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from benchmark.common import write_result
from cli import fraction, positive_int, user_errors
from generate import generate, load_sparse_model
from sparse import LAYER_GROUPS, sparse_layers
from sparse_gemv.cpu import fused_kernel, kept_row_bags, sparse_gemv_bags, sparse_gemv_rows
from thresholds.file import MAX_SPARSITY, MODES
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EVICT_BYTES = 512 << 20  # more than the last-level cache (300 MB on the machine measured)
KINDS = {"attention.wqkv": "q/k/v", "attention.wo": "o", "feed_forward.w13": "gate/up", "feed_forward.w2": "down"}
VARIANTS = ("dense", "fused", "bag", "index", "bags")


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--sparsity", type=fraction(0, MAX_SPARSITY, low_open=True), default=0.5)
    p.add_argument("--sparsity_mode", default="uniform", choices=[m for m in MODES if m != "cats"])
    p.add_argument("--tokens", type=positive_int, default=8, help="decode steps whose inputs are replayed")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/cpu-layer-products-<model>.json; "
                   "PNG beside)")
    a = p.parse_args(argv)
    if fused_kernel() is None:
        raise SystemExit("the fused CPU kernel could not be built here (see the warning above)")
    load_before = os.getloadavg()
    model = load_sparse_model(a.checkpoint_path, "cpu", torch.float32, a.sparsity, a.sparsity_mode, None)[0]
    layers = [(path, layer) for _, path, layer in sparse_layers(model)]
    inputs = {id(layer): [] for _, layer in layers}

    def capture(layer, args):
        if args[0].shape[-2] == 1:
            inputs[id(layer)].append(args[0].detach().reshape(1, layer.in_features).clone())
    hooks = [layer.register_forward_pre_hook(capture) for _, layer in layers]
    prompt = torch.tensor(load_tokenizer(a.checkpoint_path).encode(a.prompt), dtype=torch.int)
    generate(model, prompt, a.tokens + 1, temperature=0)
    for h in hooks:
        h.remove()

    built = {(id(layer), t): kept_row_bags(x, layer.thresholds, layer.split_sizes)
             for _, layer in layers for t, x in enumerate(inputs[id(layer)])}
    variants = {
        "dense": lambda layer, t, x: torch.mm(x, layer.weight_t),
        "fused": lambda layer, t, x: sparse_gemv_rows(x, layer.weight_t, layer.thresholds, layer.split_sizes),
        "bag": lambda layer, t, x: sparse_gemv_bags(x, layer.weight_t, layer.thresholds, layer.split_sizes),
        "index": lambda layer, t, x: kept_row_bags(x, layer.thresholds, layer.split_sizes),
        "bags": lambda layer, t, x: bag_sum(layer, *built[id(layer), t]),
    }

    def bag_sum(layer, unit, index, offsets, weights):
        rows = layer.weight_t if unit == layer.out_features else layer.weight_t.view(-1, unit)
        return torch.embedding_bag(rows, index, offsets, False, 0, False, weights)

    evict = torch.ones(EVICT_BYTES // 4)  # read before every timed pass: no pass finds another's rows in the cache
    times = {(n, name): {kind: [] for kind in KINDS.values()} for n in a.threads for name in variants}
    with torch.no_grad():
        for _ in range(a.rounds):
            for n in a.threads:
                torch.set_num_threads(n)
                for t in range(a.tokens):
                    for name, run in variants.items():
                        evict.sum()
                        spent = dict.fromkeys(KINDS.values(), 0.0)
                        for path, layer in layers:
                            x = inputs[id(layer)][t]
                            start = time.perf_counter()
                            run(layer, t, x)
                            spent[KINDS[path]] += time.perf_counter() - start
                        for kind, seconds in spent.items():
                            times[n, name][kind].append(seconds)
    load_after = os.getloadavg()

    def median(values):
        return sorted(values)[len(values) // 2]
    kept_bytes = dict.fromkeys(KINDS.values(), 0.0)
    dense_bytes = dict.fromkeys(KINDS.values(), 0.0)
    for path, layer in layers:
        size = layer.weight_t.element_size()
        for t in range(a.tokens):
            unit, index = built[id(layer), t][:2]
            kept_bytes[KINDS[path]] += index.numel() * unit * size / a.tokens
        dense_bytes[KINDS[path]] += layer.weight_t.numel() * size
    figures = []
    for (n, name), per_kind in times.items():
        ms = {kind: 1e3 * median(v) for kind, v in per_kind.items()}
        row = {"threads": n, "variant": name, "ms": ms, "total_ms": sum(ms.values())}
        if name != "index":
            moved = dense_bytes if name == "dense" else kept_bytes
            row["gb_s"] = {k: moved[k] / ms[k] / 1e6 for k in ms}
        figures.append(row)
        per = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
        print(f"{n} thread{'s' if n > 1 else ''}, {name}: {per} ms (total {row['total_ms']:.2f} ms a step)")
    print(f"kept weight bytes a step {sum(kept_bytes.values()) / 1e6:.1f} MB of {sum(dense_bytes.values()) / 1e6:.1f}"
          f" MB; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    result = {"model": model.config.name, "torch": torch.__version__, "dtype": "float32", "threads": a.threads,
              "sparsity": a.sparsity, "sparsity_mode": a.sparsity_mode, "tokens": a.tokens, "rounds": a.rounds,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmark.cpu_layer_products " + " ".join(sys.argv[1:] if argv is None else argv),
              "load_average_before": load_before, "load_average_after": load_after,
              "kept_bytes": kept_bytes, "dense_bytes": dense_bytes, "layer_paths": list(LAYER_GROUPS),
              "figures": figures}
    out = a.out or REPO / "benchmark" / "results" / f"cpu-layer-products-{result['model']}.json"
    write_result(result, out, plot)
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(result["kept_bytes"])
    rows = [r for r in result["figures"] if r["variant"] in ("dense", "fused", "bag")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([k + i * width for k in range(len(kinds))], [row["ms"][kind] for kind in kinds], width,
               label=f"{row['variant']}, {row['threads']} thr: {row['total_ms']:.1f} ms a step")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("ms a decode step (30 layers)")
    ax.set_title(f"{result['model']} at sparsity {result['sparsity']}: the layer products", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
