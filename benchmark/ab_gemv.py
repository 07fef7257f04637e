"""Same-process A/B of sparse GEMV kernel revisions: each given kernels.py is loaded as its own module and timed
on the bench_gemv shapes (one token) at its own pick_config choice (predicated and compact) and at a common set of
other tiles and K splits, CUDA graphs over rotating weight copies as in bench_gemv. Two H100s differ by a few per
cent, so a kernel change is judged by running both revisions here, on one machine, in one process.

    git show 157ca53:sparse_gemv/kernels.py > /tmp/before.py
    python -m benchmark.ab_gemv before=/tmp/before.py after=sparse_gemv/kernels.py --tag=-pairs

Writes benchmark/results/gemv-ab<tag>-<device>.json (rows {shape, N, K, dtype, sparsity, kernels, BLOCK_N, BLOCK_K,
SPLIT_K, COMPACT, picked, us, rel_err}) and a PNG of each revision's picked time against sparsity.
"""
import argparse
import datetime
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch
import triton

from benchmark.bench_gemv import check_result, graph_time_us, one_token_problem, shape_panels, shapes, threshold_and_reference
from benchmark.common import write_result

OTHER_CONFIGS = [(bn, bk, split) for bn, bk in ((32, 256), (64, 128)) for split in (1, 2, 4)]


def load_kernels(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"ab_kernels_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configs(module, k: int, groups, sms: int, picked_only: bool = False) -> list[tuple[dict, bool]]:
    """(config, picked): the revision's own picks, then the common alternatives (predicated, at most 4 waves)."""
    picked = [module.pick_config(k, groups, compact, sms) for compact in (False, True)]
    out = [(c, True) for c in picked]
    if picked_only:
        return out
    for bn, bk, split in OTHER_CONFIGS:
        c = {**picked[0], "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}
        if c not in picked and k // split >= bk and sum(triton.cdiv(s, bn) for s in groups) * split <= 4 * sms:
            out.append((c, False))
    return out


def bench(name, k, groups, dtype, modules, sparsities, l2, sms, picked_only=False) -> list[dict]:
    n = sum(groups)
    weights_t, x = one_token_problem(k, n, dtype, l2)
    rows = []
    for s in sparsities:
        thr, ref = threshold_and_reference(x, weights_t[0], s, groups)
        for label, module in modules.items():
            for cfg, picked in configs(module, k, groups, sms, picked_only):
                run = module.sparse_gemv_triton
                rel = check_result(run(x, weights_t[0], thr, groups, config=cfg), ref, f"{label} {name} s={s} {cfg}")
                us = graph_time_us(lambda i: run(x, weights_t[i], thr, groups, config=cfg), len(weights_t))
                rows.append({"shape": name, "N": n, "K": k, "dtype": str(dtype).replace("torch.", ""), "sparsity": s,
                             "kernels": label, **{key: cfg[key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "COMPACT")},
                             "picked": picked, "us": us, "rel_err": rel})
            mine = [r for r in rows if r["sparsity"] == s and r["kernels"] == label]
            pick = next(r for r in mine if r["picked"] and not r["COMPACT"])
            best = min(mine, key=lambda r: r["us"])
            print(f"{name:16s} s={s:.2f} {label:8s} picked {pick['us']:7.2f} us ({pick['BLOCK_N']}x{pick['BLOCK_K']} "
                  f"split {pick['SPLIT_K']})  best {best['us']:7.2f} us ({best['BLOCK_N']}x{best['BLOCK_K']} split "
                  f"{best['SPLIT_K']}{' compact' if best['COMPACT'] else ''})", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    def draw(ax, name):
        for label in result["kernels"]:
            rows = [r for r in result["rows"] if r["shape"] == name and r["kernels"] == label and r["picked"] and not r["COMPACT"]]
            ax.plot([r["sparsity"] for r in rows], [r["us"] for r in rows], "o-", label=label)
        ax.set_title(f"{name} (N={rows[0]['N']}, K={rows[0]['K']})", fontsize=9)
        ax.set_ylabel("us at pick_config")

    names = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    shape_panels(names, draw, f"sparse GEMV revisions, one token, {result['device']}", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", nargs="+", help="LABEL=PATH of a kernels.py revision, two or more")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    p.add_argument("--shapes", nargs="*", help="subset of bench_gemv's shape names")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.65, 0.8])
    p.add_argument("--picked_only", action="store_true", help="time each revision's pick_config choices only")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    pairs = [spec.split("=", 1) for spec in a.kernels]
    if len(pairs) < 2 or any(len(pair) != 2 or not Path(pair[1]).is_file() for pair in pairs):
        raise SystemExit(f"ab_gemv: give two or more LABEL=PATH of existing kernels.py files, got {a.kernels}")
    if not torch.cuda.is_available():
        raise SystemExit("ab_gemv.py measures GPU kernels and needs CUDA")
    modules = {label: load_kernels(label, Path(path)) for label, path in pairs}
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "tokens": 1, "kernels": {label: {"path": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
                                       for label, path in pairs}, "rows": []}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"gemv-ab{a.tag}-{props.name.replace(' ', '-')}.json"
    for dt in a.dtypes:
        for name, k, groups in shapes():
            if a.shapes and name not in a.shapes:
                continue
            result["rows"] += bench(name, k, groups, getattr(torch, dt), modules, a.sparsities,
                                    getattr(props, "L2_cache_size", 50 << 20), props.multi_processor_count, a.picked_only)
            write_result(result, path)  # after every shape, so a cut-short run keeps its rows
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
