"""Hardware counters of the sparse GEMV (Nsight Compute), to see what limits it where timing alone cannot.

    python -m benchmark.profile_gemv --out benchmark/results      # runs ncu on itself, writes ncu-gemv-<device>.json

Profiles the kernel at pick_config's choice on the 14336x4096 and 4096x14336 shapes (bf16, one token) at
0, 50 and 80% sparsity, both variants (and the predicated one at 90%), with cuBLAS at 0% beside it; besides the
sections, the per-instruction warp stall reasons and the executed instruction count. Each case is launched over rotating
weight copies (L2 never holds the weights), and only the last launch of each case is kept. Clocks are left
as they are (--clock-control none), so durations are comparable with the CUDA-graph timings of bench_gemv.
"""
import argparse
import csv
import datetime
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmark.bench_gemv import threshold_for

SHAPES = (("14336x4096", 4096, 14336), ("4096x14336", 14336, 4096))  # (name, K, N)
CASES = ((0.0, False), (0.5, False), (0.5, True), (0.8, False), (0.8, True), (0.9, False))  # (sparsity, compact)
COPIES = 8
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
# Why warps wait, per issued instruction (what the WarpStateStats section sums into one number).
STALLS = ("barrier", "long_scoreboard", "short_scoreboard", "wait", "mio_throttle", "lg_throttle", "math_pipe_throttle",
          "not_selected", "selected", "dispatch_stall", "drain", "membar", "no_instruction", "branch_resolving", "misc",
          "sleeping", "tex_throttle", "imc_miss")
METRICS = [f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS] + [
    "l1tex__t_sector_hit_rate.pct", "smsp__inst_executed.sum", "dram__bytes_read.sum"]


def launch_all() -> list[str]:
    """Run every case COPIES times; returns the case label of each sparse-kernel launch, in order."""
    from sparse_gemv.kernels import sparse_gemv_triton
    labels = []
    gen = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        # made on the CPU, so the only kernels ncu sees are the ones being measured
        weights = [(torch.randn(n, k, generator=gen) / math.sqrt(k)).to(torch.bfloat16) for _ in range(COPIES)]
        weights_t = [w.t().contiguous().cuda() for w in weights]
        weights = [w.cuda() for w in weights]
        x_cpu = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        x = x_cpu.cuda()
        for i in range(COPIES):
            F.linear(x, weights[i])  # cuBLAS, in the layout it is given for dense decoding
        for s, compact in CASES:
            thr = threshold_for(x_cpu, s, [n]).cuda()
            for i in range(COPIES):
                sparse_gemv_triton(x, weights_t[i], thr, [n], compact=compact)
                labels.append(f"{name} {'compact' if compact else 'predicated'} s={s:.2f}")
        torch.cuda.synchronize()
        del weights, weights_t
    return labels


def parse(csv_text: str, labels: list[str]) -> list[dict]:
    """ncu --csv --page details -> one dict per kept launch: {case, kernel, metrics {section/name [unit]: value}}.
    Sparse-kernel launches take the labels in order; any other kernel (cuBLAS) belongs to the shape of the
    next sparse launch. The last launch of each case (and of each cuBLAS kernel name) is kept."""
    rows = list(csv.DictReader(io.StringIO(csv_text[csv_text.index('"ID"'):])))
    launches = {}
    for r in rows:
        entry = launches.setdefault(int(r["ID"]), {"kernel": r["Kernel Name"][:80], "metrics": {}})
        unit = f" [{r['Metric Unit']}]" if r["Metric Unit"] else ""
        value = r["Metric Value"].replace(",", "")
        try:
            value = float(value)
        except ValueError:
            pass
        entry["metrics"][f"{r['Section Name']}/{r['Metric Name']}{unit}"] = value
    ordered = [launches[i] for i in sorted(launches)
               if "fill" not in launches[i]["kernel"].lower() and "elementwise" not in launches[i]["kernel"]]
    sparse = [e for e in ordered if "_sparse_gemv_kernel" in e["kernel"]]
    if len(sparse) != len(labels):
        raise RuntimeError(f"ncu reported {len(sparse)} sparse-kernel launches for {len(labels)} made")
    kept, pending, i = {}, [], 0
    for e in ordered:
        if "_sparse_gemv_kernel" not in e["kernel"]:
            pending.append(e)
            continue
        shape = labels[i].split()[0]
        for c in pending:
            kept[f"{shape} cublas s=0.00 {c['kernel'][:40]}"] = c
        pending = []
        kept[labels[i]] = e
        i += 1
    return [{"case": case, **e} for case, e in kept.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    p.add_argument("--tag", default="", help="suffix of the output name, so a new profile keeps the old file")
    p.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)  # the child ncu profiles
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_gemv.py profiles GPU kernels and needs CUDA")
    if a.launch:
        print(json.dumps(launch_all()))
        return
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on the PATH")
    cmd = [ncu, "--clock-control", "none", "--csv", "--page", "details", "--print-units", "base"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += ["--metrics", ",".join(METRICS)]
    cmd += [sys.executable, "-m", "benchmark.profile_gemv", "--launch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"ncu failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}")
    label_line = next(line for line in proc.stdout.splitlines() if line.startswith('["'))
    launches = parse(proc.stdout, json.loads(label_line))
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "ncu": " ".join(cmd[:-4]), "dtype": "bfloat16", "tokens": 1, "launches": launches}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"ncu-gemv{a.tag}-{props.name.replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1))
    for e in launches:
        m = e["metrics"]
        pick = {k.split("/", 1)[1]: v for k, v in m.items() if any(s in k for s in (
            "Duration", "DRAM Throughput", "Memory Throughput", "Achieved Occupancy", "Registers Per Thread",
            "Dynamic Shared Memory Per Block", "Warp Cycles Per Issued Instruction", "issue_stalled", "inst_executed"))}
        print(e["case"], json.dumps(pick))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
