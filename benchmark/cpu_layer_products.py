"""Where the sparse layers' time goes in a CPU decode step: the layer products alone, on real decode inputs.

    python -m benchmark.cpu_layer_products                     # default SmolLM2 at 0.5 (uniform), 8 tokens, 3 rounds

Captures every sparse layer's input over --tokens greedy decode steps, then replays them layer by layer in the order a
step runs them, after reading a buffer larger than the last-level cache (no pass finds the rows of the one before in
it: a pessimistic cache, the same for every variant), and times each call in the thread's CPU time (one thread; the
time other tenants of a shared machine held the core is left out):
  dense  torch.mm(x, weight_t), every row (what a dense step's linear reads);
  rows   sparse_gemv.cpu.sparse_gemv_rows, the eager CPU path (the bags built, then summed);
  index  kept_row_bags alone: the mask, the kept rows, the bags' index, starts and weights;
  bags   torch.embedding_bag alone, on bags built beforehand;
and, for each kind of layer, the bags alone at the path's column unit and narrower ones (the width embedding_bag sums
a row in), that kind's 30 layers one after another.
Figures are medians over rounds and tokens, in ms per decode step (30 layers of a kind). Writes JSON and a PNG.
"""
import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmark.common import write_result
from cli import fraction, positive_int, user_errors
from generate import generate, load_sparse_model
from sparse import LAYER_GROUPS, sparse_layers
from sparse_gemv.cpu import kept_row_bags, sparse_gemv_rows
from thresholds.file import MAX_SPARSITY, MODES
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EVICT_BYTES = 512 << 20  # more than the last-level cache (300 MB on the machine measured)
KINDS = {"attention.wqkv": "q/k/v", "attention.wo": "o", "feed_forward.w13": "gate/up", "feed_forward.w2": "down"}


def bags_at(x: torch.Tensor, layer, unit: int) -> tuple:
    """kept_row_bags' bags for one token with columns cut into units of `unit` (a divisor of every group)."""
    per_group = torch.tensor(layer.split_sizes) // unit
    group_of_unit = torch.repeat_interleave(torch.arange(len(layer.split_sizes)), per_group)
    values = x.view(-1)
    unit_thresholds = layer.thresholds.view(len(layer.split_sizes), -1).index_select(0, group_of_unit)
    bag, row = torch.where(values.abs() > unit_thresholds)
    units = group_of_unit.numel()
    return (layer.weight_t.view(-1, unit), torch.add(bag, row, alpha=units),
            torch.searchsorted(bag, torch.arange(units)), values.index_select(0, row))


def unit_widths(layer) -> list[int]:
    """The column units to time the bags at: the path's own one-thread unit (the groups' common divisor) and the
    narrower ones that divide every group, down to 64 columns."""
    widest = math.gcd(*layer.split_sizes)
    return sorted({widest // d for d in (1, 2, 3, 4, 6, 8, 12, 16, 24) if widest % d == 0 and widest // d >= 64},
                  reverse=True)


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--sparsity", type=fraction(0, MAX_SPARSITY, low_open=True), default=0.5)
    p.add_argument("--sparsity_mode", default="uniform", choices=[m for m in MODES if m != "cats"])
    p.add_argument("--tokens", type=positive_int, default=8, help="decode steps whose inputs are replayed")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/cpu-layer-products-<model>.json; "
                   "PNG beside)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
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
        "rows": lambda layer, t, x: sparse_gemv_rows(x, layer.weight_t, layer.thresholds, layer.split_sizes),
        "index": lambda layer, t, x: kept_row_bags(x, layer.thresholds, layer.split_sizes),
        "bags": lambda layer, t, x: bag_sum(layer, *built[id(layer), t]),
    }

    def bag_sum(layer, unit, index, offsets, weights):
        rows = layer.weight_t if unit == layer.out_features else layer.weight_t.view(-1, unit)
        return torch.embedding_bag(rows, index, offsets, False, 0, False, weights)

    by_unit = {}  # (kind, unit) -> the layers of that kind, with their bags at that unit built beforehand
    for path, layer in layers:
        for unit in unit_widths(layer):
            by_unit.setdefault((KINDS[path], unit), []).append(layer)
            for t, x in enumerate(inputs[id(layer)]):
                built[id(layer), t, unit] = bags_at(x, layer, unit)
    evict = torch.ones(EVICT_BYTES // 4)  # read before every timed pass: no pass finds another's rows in the cache
    times = {name: {kind: [] for kind in KINDS.values()} for name in variants}
    times.update({f"bags, {kind} in units of {unit}": {kind: []} for kind, unit in by_unit})
    with torch.no_grad():
        for _ in range(a.rounds):
            for t in range(a.tokens):
                for name, run in variants.items():
                    evict.sum()
                    spent = dict.fromkeys(KINDS.values(), 0.0)
                    for path, layer in layers:
                        x = inputs[id(layer)][t]
                        start = time.thread_time()
                        run(layer, t, x)
                        spent[KINDS[path]] += time.thread_time() - start
                    for kind, seconds in spent.items():
                        times[name][kind].append(seconds)
                for (kind, unit), kind_layers in by_unit.items():  # one kind's layers one after another
                    evict.sum()
                    start = time.thread_time()
                    for layer in kind_layers:
                        rows, index, offsets, weights = built[id(layer), t, unit]
                        torch.embedding_bag(rows, index, offsets, False, 0, False, weights)
                    times[f"bags, {kind} in units of {unit}"][kind].append(time.thread_time() - start)
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
    figures = {}
    for name, per_kind in times.items():
        ms = {kind: 1e3 * median(v) for kind, v in per_kind.items()}
        figures[name] = {"ms": ms, "total_ms": sum(ms.values()) if name in ("dense", "rows", "index", "bags") else None}
    for name in ("dense", "rows", "bags"):
        moved = dense_bytes if name == "dense" else kept_bytes
        figures[name]["gb_s"] = {k: moved[k] / figures[name]["ms"][k] / 1e6 for k in figures[name]["ms"]}
    for name, f in figures.items():
        per = ", ".join(f"{k} {v:.2f}" for k, v in f["ms"].items())
        print(f"{name}: {per} ms" + (f" (total {f['total_ms']:.2f} ms a step)" if f["total_ms"] else ""))
    print(f"kept weight bytes a step {sum(kept_bytes.values()) / 1e6:.1f} MB of {sum(dense_bytes.values()) / 1e6:.1f}"
          f" MB; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    result = {"model": model.config.name, "torch": torch.__version__, "dtype": "float32", "threads": 1,
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
    names = ("dense", "rows", "bags", "index")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ms = result["figures"][name]["ms"]
        ax.bar([k + i * width for k in range(len(kinds))], [ms.get(kind, 0) for kind in kinds], width,
               label=f"{name}: {result['figures'][name]['total_ms']:.1f} ms a step")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("ms of thread CPU time a decode step (30 layers)")
    ax.set_title(f"{result['model']} at sparsity {result['sparsity']}, one thread: the layer products", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
