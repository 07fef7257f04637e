"""Where a sparse GEMV launch spends its time, program by program: every program of the kernel stamps the GPU's
global timer (and its SM) when it starts, when its wait on the previous kernel returns, when its kept-row list is
done (compact variant), when its weight loop ends and when it exits. Launched as bench_gemv times it: one token,
a CUDA graph over rotating weight copies, programmatic dependent launch on Hopper, so every launch follows one of
the same kernel; times are relative to the end of the previous launch's last program.

    python -m benchmark.gemv_timeline --out benchmark/results

The stamps go into an instrumented copy of sparse_gemv/kernels.py, built in a temporary folder (the kernel itself
carries no timing code); `instrumented_source` fails if the kernel no longer has the lines it stamps after.
Besides the bench_gemv shapes it times an N x 4096 weight with N = 128 x the SM count, whose 64 x 128 tiles split
in two give every SM exactly four programs, to tell the grid's quantisation from the programs' own spread.
Writes gemv-timeline<tag>-<device>.json (per launch: wake-up after the previous launch, spread of the programs'
loop ends, end; per program for one launch; how alike the launches are in which SMs and which programs finish late)
and a PNG of the programs' loop ends.
"""
import argparse
import datetime
import importlib.util
import socket
import sys
import tempfile
from pathlib import Path

import torch
import triton

from benchmark.bench_gemv import capture_rotating_graph, one_token_problem, shapes, threshold_for
from benchmark.common import write_result

KERNELS = Path(__file__).resolve().parent.parent / "sparse_gemv" / "kernels.py"
STAMPS = 8  # words per program: SM, start, wait returned, list done, loop done, exit (two spare)

# (anchor line in kernels.py, text put after it): each stamp follows the step it times.
_PATCHES = [
    ("                        PACK: tl.constexpr, EVEN_N: tl.constexpr, REDUCE: tl.constexpr, "
     "LIST_CHUNK: tl.constexpr):",
     "    t_start = tl.extra.cuda.globaltimer()\n"),
    ("        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output: nothing is read before it is complete",
     "    t_wait = tl.extra.cuda.globaltimer()  # after the wait, or when there is none\n"),
    ("            count += tl.sum(keep, 0)", "        t_list = tl.extra.cuda.globaltimer()\n"),
    ("    if PACK > 1:\n        acc = sum_word_columns(", None),  # t_loop goes in front of this one
    ("                tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch (and the next graph replay)",
     "    t_exit = tl.extra.cuda.globaltimer()\n"
     "    stamp = stamp_ptr + (pid_k * tl.num_programs(0) + pid_n) * 8\n"
     "    tl.store(stamp, tl.extra.cuda.smid().to(tl.int64))\n"
     "    tl.store(stamp + 1, t_start)\n"
     "    tl.store(stamp + 2, t_wait)\n"
     "    if COMPACT:\n"
     "        tl.store(stamp + 3, t_list)\n"
     "    else:\n"
     "        tl.store(stamp + 3, t_wait)\n"
     "    tl.store(stamp + 4, t_loop)\n"
     "    tl.store(stamp + 5, t_exit)\n"),
]


def instrumented_source(src: str) -> str:
    """kernels.py with the stamps added: the kernel takes a stamp_ptr (int64 [programs, 8]) that sparse_gemv_triton
    fills from the module-level STAMP_BUFFER[0]."""
    for anchor, after in _PATCHES:
        if src.count(anchor) != 1:
            raise RuntimeError(f"gemv_timeline: the kernel source no longer has the line {anchor.splitlines()[0]!r}; "
                               "update _PATCHES to the kernel")
        if after is None:
            src = src.replace(anchor, "    t_loop = tl.extra.cuda.globaltimer()\n" + anchor)
        else:
            src = src.replace(anchor, anchor + "\n" + after.rstrip("\n"))
    src = src.replace("LIST_CHUNK: tl.constexpr):", "LIST_CHUNK: tl.constexpr, stamp_ptr=None):", 1)
    launch = "    _sparse_gemv_kernel[grid](*args, **flags, **meta,"
    if src.count(launch) != 1:
        raise RuntimeError("gemv_timeline: the kernel launch in sparse_gemv_triton changed; update instrumented_source")
    src = src.replace(launch, "    _sparse_gemv_kernel[grid](*args, stamp_ptr=STAMP_BUFFER[0], **flags, **meta,")
    return "STAMP_BUFFER = [None]\n" + src


def load_instrumented():
    folder = Path(tempfile.mkdtemp(prefix="gemv_timeline_"))
    path = folder / "kernels_stamped.py"
    path.write_text(instrumented_source(KERNELS.read_text()))
    spec = importlib.util.spec_from_file_location("kernels_stamped", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantiles(values: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in (values.min(), values.median(), values.max())]


def median_pair_correlation(rows: list[torch.Tensor]) -> float:
    """Median, over all pairs of rows (launches), of the Pearson correlation between the two rows' values."""
    corr = torch.corrcoef(torch.stack(rows))
    return round(float(corr[torch.triu(torch.ones_like(corr, dtype=torch.bool), diagonal=1)].nan_to_num().median()), 3)


def timeline(kernels, name, k, groups, sparsity, compact, reduce, l2, config=None) -> dict:
    """Stamps of every program of each launch but the first in one replay of a graph over rotating weights, relative
    to the end of the launch before; the row keeps the launch of median span whole."""
    n = sum(groups)
    weights_t, x = one_token_problem(k, n, torch.bfloat16, l2)
    thr = threshold_for(x, sparsity, groups)
    copies = len(weights_t)
    cfg = config or kernels.default_config(x.device, k, groups, compact, reduce)
    programs = sum(triton.cdiv(s, cfg["BLOCK_N"]) for s in groups) * cfg["SPLIT_K"]
    buffers = [torch.zeros(programs * STAMPS, dtype=torch.int64, device="cuda") for _ in range(copies)]

    def call(i):
        kernels.STAMP_BUFFER[0] = buffers[i]
        return kernels.sparse_gemv_triton(x, weights_t[i], thr, groups, compact=compact, reduce=reduce, config=config)

    graph = capture_rotating_graph(call, copies)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    stamps = [b.view(programs, STAMPS).cpu() for b in buffers]
    launches, sm_loop_ends, program_loop_ends = [], [], []
    for i in range(1, copies):
        previous_end = int(stamps[i - 1][:, 5].max())
        t = (stamps[i][:, 1:6] - previous_end).double() / 1000  # us: start, wait, list, loop, exit
        per_sm = torch.bincount(stamps[i][:, 0], minlength=1)
        # mean loop end of each SM's programs, to tell SMs that are slow in every launch from a spread that moves
        sm_loop_ends.append(torch.zeros(len(per_sm), dtype=torch.float64).index_add_(0, stamps[i][:, 0], t[:, 3])
                            / per_sm.clamp(min=1))
        program_loop_ends.append(t[:, 3])
        launches.append({"span_us": float(t[:, 4].max()), "start_us": quantiles(t[:, 0]), "wait_us": quantiles(t[:, 1]),
                         "list_us": quantiles(t[:, 2]), "loop_done_us": quantiles(t[:, 3]), "exit_us": quantiles(t[:, 4]),
                         "loop_spread_us": float(t[:, 3].max() - t[:, 3].min()),
                         "epilogue_us": float(t[:, 4].max() - t[:, 3].max()),
                         "sms": int((per_sm > 0).sum()), "max_programs_per_sm": int(per_sm.max()),
                         "program_loop_done_us": [round(float(v), 3) for v in t[:, 3]]})
    median = sorted(launches, key=lambda launch: launch["span_us"])[len(launches) // 2]
    sms = min(len(e) for e in sm_loop_ends)
    busy = torch.stack([e[:sms] > 0 for e in sm_loop_ends]).all(0)  # SMs that ran programs in every launch
    kept_bytes = float((x.abs() > thr[0]).float().mean()) * n * k * 2
    row = {"shape": name, "N": n, "K": k, "sparsity": sparsity, "compact": compact, "reduce": reduce,
           **{key: cfg[key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K")}, "programs": programs,
           "median_launch": median, "spans_us": [round(launch["span_us"], 3) for launch in launches],
           # Pearson correlation, over SMs (over programs), of two launches' per-SM mean (per-program) loop ends,
           # median over all pairs of launches: near 1 if the same SMs (programs) finish late in every launch, near 0
           # if which ones do changes from launch to launch
           "sm_loop_end_correlation": median_pair_correlation([e[:sms][busy] for e in sm_loop_ends]),
           "program_loop_end_correlation": median_pair_correlation(program_loop_ends),
           "kept_GBps": kept_bytes / (median["span_us"] * 1e-6) / 1e9}
    print(f"{name:22s} s={sparsity:.2f} {'compact' if compact else 'predicated':10s} {'reduce' if reduce else 'partials':8s}"
          f" span {median['span_us']:6.2f} us  wait {median['wait_us'][1]:5.2f}  list {median['list_us'][1]:5.2f}"
          f"  loop ends {median['loop_done_us'][0]:6.2f}/{median['loop_done_us'][1]:6.2f}/{median['loop_done_us'][2]:6.2f}"
          f"  exit {median['exit_us'][2]:6.2f}  {programs} programs, <= {median['max_programs_per_sm']}/SM"
          f"  late-SM corr {row['sm_loop_end_correlation']:.2f},"
          f" late-program corr {row['program_loop_end_correlation']:.2f}",
          flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["sparsity"] == 0.5]
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in rows:
        ends = sorted(r["median_launch"]["program_loop_done_us"])
        ax.plot(ends, [j / len(ends) for j in range(len(ends))],
                label=f"{r['shape']} {'compact' if r['compact'] else 'pred.'} {'reduce' if r['reduce'] else 'partials'}"
                      f" (exit {r['median_launch']['span_us']:.1f} us)")
    ax.set_xlabel("us after the previous launch ended")
    ax.set_ylabel("fraction of programs whose weight loop has ended")
    ax.set_title(f"Sparse GEMV programs' loop ends at 50% sparsity, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.8])
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_timeline.py stamps GPU kernels and needs CUDA")
    kernels = load_instrumented()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    sms = props.multi_processor_count
    chosen = {"8b qkv", "8b o", "8b gate/up", "8b down", "14336x4096"}
    even_grid = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "COMPACT": False, "STAGES": 3, "num_warps": 4}
    rows = []
    for s in a.sparsities:
        for name, k, groups in shapes():
            if name not in chosen:
                continue
            # as the compiled decode step runs them: o and down return partials, q/k/v hands them to the attention op
            partials = name in ("8b qkv", "8b o", "8b down")
            rows.append(timeline(kernels, name, k, groups, s, False, not partials, l2))
            if name == "14336x4096":
                rows.append(timeline(kernels, name, k, groups, s, True, True, l2))
                rows.append(timeline(kernels, name, k, groups, s, False, False, l2, config=even_grid))
        n = 128 * sms
        rows.append(timeline(kernels, f"{n}x4096 (4/SM)", 4096, [n], s, False, False, l2, config=even_grid))
    device = props.name.replace(" ", "-")
    result = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "sms": sms,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "command": "python " + " ".join(sys.argv), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"gemv-timeline{a.tag}-{device}.json"
    write_result(result, path, plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
