"""CPU decoding, dense against sparse, with the memory bandwidth a plain copy reaches in the same process.

    python -m benchmark.bench_cpu_decode                       # default SmolLM2, dense and 0.5 (uniform), 5 rounds
    python -m benchmark.bench_cpu_decode --sparsity 0.4 0.5 --rounds 7 --threads 1 2
    python -m benchmark.bench_cpu_decode --threads 1 2 --checkpoint_path checkpoints/SmolLM2-135M-Instruct \
        checkpoints/SmolLM2-135M-Instruct-Q4_1             # fp32 beside the default GGUF at its own Q4_1

generate.py's model loading and timed generation (greedy, the default prompt). Several checkpoints (a float one and one
that keeps its quantization, or --int8 / --int4 applied at load) are measured side by side, each dense and at every
sparsity. Each round runs, for every thread count, a plain copy of a buffer larger than the last-level cache, then one
generation per model, so that a machine whose load changes affects every model alike; the figures are the medians over
rounds, and decode_vs_dense_paired is the median of each round's own sparse / dense ratio (the two runs of a round are
seconds apart). Decode tokens/s leave out the prefill (the time to the first token); decode_cpu_ms is the process's CPU
time per decode step, which leaves out the time other tenants of a shared machine held the core (with several threads
it also counts their spinning). The dense model's bytes per step are its weights (generate.weight_bytes); the copy's
bandwidth counts the bytes read and written. vs_first_dense is the median of each round's ratio to the first
checkpoint's dense model. rss_bytes is how much the process's resident memory (VmRSS) grew when the model was loaded
and run once (its weights, caches and buffers). The load average before and after every round is recorded: on a shared
machine, say so. Writes JSON and a PNG.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark.common import copy_bandwidth, write_result
from cli import add_int4_args, fraction, int4_quant, positive_int, user_errors
from generate import (cpu_threads, decode_one_token, load_sparse_model, measure_realized_sparsity, timed_generate,
                      weight_bytes)
from sparse import sparse_layers
from thresholds.file import MAX_SPARSITY, MODES
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, nargs="+", default=[DEFAULT_CHECKPOINT],
                   help="one or more checkpoints, measured side by side (the first is the ratios' baseline)")
    p.add_argument("--sparsity", type=fraction(0, MAX_SPARSITY), nargs="+", default=[0.5])
    p.add_argument("--sparsity_mode", default="uniform", choices=MODES)
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--max_new_tokens", type=positive_int, default=100)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--threads", type=positive_int, nargs="+", help="thread counts, measured in turn in every round "
                   "(default: the one generate.py picks)")
    p.add_argument("--compile", action="store_true", help="decode steps compiled (generate.py --compile)")
    p.add_argument("--int8", action="store_true", help="float checkpoints' projections as int8 at load (generate.py)")
    add_int4_args(p)
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/cpu-decode-<model>[-compiled].json; "
                   "PNG beside)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.max_new_tokens < 2:
        raise SystemExit("--rounds must be at least 1 and --max_new_tokens at least 2")
    group_quant = int4_quant(a)
    for path in a.checkpoint_path:
        if not (path / "model.safetensors").exists():
            raise SystemExit(f"no checkpoint at {path} (model.safetensors): convert one with convert_hf_checkpoint.py")
    threads = a.threads or [cpu_threads()]
    load_before = os.getloadavg()
    tokenizer = load_tokenizer(a.checkpoint_path[0])
    prompt = torch.tensor(tokenizer.encode(a.prompt), dtype=torch.int)
    # (checkpoint's weight format, sparsity) -> the model, its resident memory, its decode step
    models, rss, decode_fns = {}, {}, {}
    torch.set_num_threads(threads[0])
    for path in a.checkpoint_path:
        for s in [0.0, *a.sparsity]:
            # weights may be mapped from the file, resident once read: loaded and run once (the warm-up)
            before = resident_bytes()
            model = load_sparse_model(path, "cpu", torch.float32, s, a.sparsity_mode, None, int8=a.int8,
                                      group_quant=group_quant)[0]
            key = (weight_format(model), s)
            if key in models:
                raise SystemExit(f"{path} has the weight format of another checkpoint given ({key[0]})")
            decode_fn = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if a.compile
                         else decode_one_token)
            timed_generate(model, prompt, a.max_new_tokens, temperature=0, decode_fn=decode_fn)
            models[key], rss[key], decode_fns[key] = model, resident_bytes() - before, decode_fn
    baseline = next(iter(models))
    for t in threads[1:]:
        torch.set_num_threads(t)
        for key, model in models.items():  # warm-up (and compilation)
            timed_generate(model, prompt, a.max_new_tokens, temperature=0, decode_fn=decode_fns[key])
    samples = {(t, key): [] for t in threads for key in models}
    copies = {t: [] for t in threads}
    loads = []
    for _ in tqdm(range(a.rounds), desc="rounds"):
        loads.append(os.getloadavg()[0])
        for t in threads:
            torch.set_num_threads(t)
            copies[t].append(copy_bandwidth("cpu", 512 << 20, repeats=10) * 1e9)  # bytes/s
            for key, model in models.items():
                first = []  # the process's CPU time at the first token, when decoding starts
                seq, times = timed_generate(model, prompt, a.max_new_tokens, temperature=0, decode_fn=decode_fns[key],
                                            callback=lambda _: first or first.append(time.process_time()))
                cpu = time.process_time() - first[0]
                new = seq.shape[1] - prompt.numel()
                samples[t, key].append({"tok_s": new / times["total"],
                                        "decode_tok_s": (new - 1) / (times["total"] - times["to_first"]),
                                        "decode_cpu_ms": 1e3 * cpu / (new - 1), "seq": seq})
    loads.append(os.getloadavg()[0])
    load_after = os.getloadavg()

    def median(values):
        return sorted(values)[len(values) // 2]
    rows = []
    for t in threads:
        copy = median(copies[t])
        first_dense = samples[t, baseline]
        for (fmt, s), model in models.items():
            runs = samples[t, (fmt, s)]
            dense = samples[t, (fmt, 0.0)]
            tok_s = median([r["tok_s"] for r in runs])
            decode = median([r["decode_tok_s"] for r in runs])
            sizes = weight_bytes(model)
            moved = sizes["total"]
            row = {"weights": fmt, "threads": t, "sparsity": s, "tok_s": tok_s, "decode_tok_s": decode,
                   "decode_cpu_ms": median([r["decode_cpu_ms"] for r in runs]), "rss_bytes": rss[fmt, s],
                   "tok_s_rounds": [r["tok_s"] for r in runs], "decode_tok_s_rounds": [r["decode_tok_s"] for r in runs],
                   "decode_cpu_ms_rounds": [r["decode_cpu_ms"] for r in runs]}
            if s > 0:
                real = measure_realized_sparsity(model, runs[-1]["seq"], prompt.numel())
                moved = sizes["total"] - sizes["sparse"] + real["sparse_bytes_moved"]
                row.update(realized_sparsity=real["model"])
            paired = [r["decode_tok_s"] / d["decode_tok_s"] for r, d in zip(runs, dense)]
            row.update(bytes_per_step=moved, dense_weight_bytes=sizes["total"], gb_s=moved * decode / 1e9,
                       fraction_of_copy=moved * decode / copy,
                       copy_gb_s=copy / 1e9, tok_s_vs_dense=tok_s / median([r["tok_s"] for r in dense]),
                       decode_vs_dense=decode / median([r["decode_tok_s"] for r in dense]),
                       decode_vs_dense_paired=median(paired), decode_vs_dense_rounds=paired,
                       vs_first_dense=median([r["decode_tok_s"] / d["decode_tok_s"]
                                              for r, d in zip(runs, first_dense)]),
                       cpu_vs_dense=median([r["decode_cpu_ms"] for r in dense]) / row["decode_cpu_ms"])
            rows.append(row)
            print(f"{fmt}, {t} thread{'s' if t > 1 else ''}, sparsity {s}: {tok_s:.2f} tokens/s "
                  f"({row['tok_s_vs_dense']:.2f}x dense), decode {decode:.2f} tokens/s ({row['decode_vs_dense']:.2f}x, "
                  f"paired by round {row['decode_vs_dense_paired']:.2f}x; {row['vs_first_dense']:.2f}x "
                  f"{baseline[0]} dense), {row['decode_cpu_ms']:.1f} ms CPU a step ({row['cpu_vs_dense']:.2f}x), "
                  f"{row['gb_s']:.2f} GB/s = {row['fraction_of_copy']:.0%} of copy ({copy / 1e9:.1f} GB/s), "
                  f"{rss[fmt, s] / 1e9:.2f} GB resident" +
                  (f", realised sparsity {row['realized_sparsity']:.3f}" if s > 0 else ""))
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, by round "
          f"{[round(x, 2) for x in loads]}")
    formats = list(dict.fromkeys(fmt for fmt, _ in models))
    result = {"model": models[baseline].config.name, "device": cpu_name(), "cores": os.cpu_count(), "threads": threads,
              "torch": torch.__version__, "dtype": "float32", "weights": formats, "compile": a.compile,
              "checkpoints": [str(path) for path in a.checkpoint_path],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmark.bench_cpu_decode " + " ".join(sys.argv[1:] if argv is None else argv),
              "prompt": a.prompt, "max_new_tokens": a.max_new_tokens, "rounds": a.rounds,
              "sparsity_mode": a.sparsity_mode, "copy_gb_s": {t: median(copies[t]) / 1e9 for t in threads},
              "copy_gb_s_rounds": {t: [c / 1e9 for c in copies[t]] for t in threads},
              "dense_weight_bytes": weight_bytes(models[baseline])["total"], "load_average_before": load_before,
              "load_average_after": load_after, "load_average_rounds": loads, "rows": rows}
    stem = (f"cpu-decode-{result['model']}" + "".join(f"-{fmt}" for fmt in formats if fmt != "float32")
            + ("-compiled" if a.compile else ""))
    out = a.out or REPO / "benchmark" / "results" / f"{stem}.json"
    write_result(result, out, plot)
    print(f"wrote {out}")


def weight_format(model) -> str:
    """The projections' weights: float32, int8 (one scale per column) or int<bits>-g<group size>[-zeros]."""
    layer = next((layer for _, _, layer in sparse_layers(model)), None)
    if layer is None or layer.scales is None:
        return "float32"
    if layer.int8:
        return "int8"
    quant = layer.group_quant
    return f"int{quant.bits}-g{quant.group_size}" + ("-zeros" if quant.zero_point else "")


def resident_bytes() -> int:
    """The process's resident memory (VmRSS; 0 where /proc is missing)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in result["rows"]:
        label = (f"{row['weights']}, {row['threads']} thr, "
                 + ("dense" if row["sparsity"] == 0 else f"sparsity {row['sparsity']}"))
        ax.plot(range(1, len(row["decode_tok_s_rounds"]) + 1), row["decode_tok_s_rounds"], "o-",
                label=f"{label}: {row['decode_tok_s']:.1f} tok/s" + (f" ({row['decode_vs_dense_paired']:.2f}x)"
                                                                     if row["sparsity"] else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    loads = result["load_average_rounds"]
    ax.set_title(f"{result['model']} on CPU{', compiled' if result['compile'] else ''}, {result['cores']} cores; "
                 f"load {min(loads):.1f}-{max(loads):.1f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
