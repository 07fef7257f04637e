"""Anchors: GPT-Fast's dense model and TEAL's own sparse code, timed beside this project's sparse model.

    python -m benchmark.anchors --gpt_fast ~/src/gpt-fast --teal ~/src/TEAL     # Llama-3-8B, Mistral-7B, Llama-2-7B
    bash benchmark/anchors.sh ~/src/gpt-fast ~/src/TEAL

The two anchors are loaded from your own clones of https://github.com/pytorch-labs/gpt-fast and
https://github.com/FasterDecoding/TEAL (their model.py, and TEAL's kernels/): nothing of theirs is copied here.
Every model runs bench_decode's loop and protocol: random weights at the named shapes, bf16, batch 1, a 5-token
prompt, 200 new tokens, the decode step compiled with mode="reduce-overhead" (CUDA graphs), one warm-up then the
median of 3 runs, this project's generate loop and sampling driving each model's forward. TEAL's model is set up as
its generate.py's _load_model does (its kernels, column-major weights, its forwards swapped in by its
apply_monkeypatch), with uniform thresholds, each the quantile of |input| at the target sparsity over a random-token
prefill, as bench_decode calibrates this project's model. Writes JSON and a PNG (tokens/s per model).
"""
import argparse
import datetime
import importlib.util
import sys
import traceback
from pathlib import Path

import torch
import torch._inductor.config

from benchmark.bench_decode import calibrate_on_random_prefill, set_uniform, time_decode
from benchmark.common import copy_bandwidth, write_result
from cli import fraction, positive_int, user_errors
from generate import decode_one_token, weight_bytes
from model import random_model
from sparse import sparsify
from thresholds.file import MAX_SPARSITY

REPO = Path(__file__).resolve().parent.parent
# This project's names, GPT-Fast's and TEAL's config names for the same shapes.
MODELS = {"llama-3-8b": "llama-3-8b", "mistral-7b": "Mistral-7B", "llama-2-7b": "7B"}


def load_module(name: str, path: Path):
    """A module of the user's clone, loaded from its file under a name of its own (GPT-Fast's and TEAL's model.py
    would otherwise both be `model`, as is this project's) and registered under it, as Python's import does, so that
    the clone's own imports of that name find it."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the folder of your clone (--gpt_fast / --teal)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_weights(model: torch.nn.Module, device, dtype, seed: int = 0) -> torch.nn.Module:
    """An anchor model built on the meta device, materialised with random weights (norms at one), as random_model
    fills this project's."""
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def anchor_model(module, config_name: str, device, dtype, max_seq: int):
    with torch.device("meta"):
        model = module.Transformer.from_name(config_name)
    model = random_weights(model, device, dtype)
    with torch.device(device):  # their caches, RoPE table and mask on the device, as their generate.py makes them
        model.setup_caches(max_batch_size=1, max_seq_length=max_seq)
    return model


def teal_thresholds(model, sparsity: float, n_tokens: int) -> list[dict]:
    """Per layer, the quantile of |x| at `sparsity` at TEAL's four inputs (q/k/v, o, gate/up, down) over a random
    prefill of the dense model."""
    found = [{} for _ in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):
        for site, module in (("qkv", layer.attention.wqkv), ("o", layer.attention.wo),
                             ("gate_up", layer.feed_forward.w1), ("down", layer.feed_forward.w2)):
            def pre(mod, args, i=i, site=site):
                x = args[0].float().abs().flatten()
                found[i][site] = float(torch.quantile(x[:1 << 24], sparsity))
            hooks.append(module.register_forward_pre_hook(pre))
    idx = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx.to(model.output.weight.device), torch.arange(n_tokens, device=model.output.weight.device))
    for h in hooks:
        h.remove()
    return found


def teal_sparsify(model, kernels, thresholds: list[dict], device_type: str):
    """TEAL's generate.py _load_model, monkeypatch_layer: its GEMV kernels, column-major weights, the thresholds,
    and its own apply_monkeypatch, which swaps in its sparse forwards."""
    for layer, t in zip(model.layers, thresholds):
        ff, attn = layer.feed_forward, layer.attention
        ff.gemv1 = kernels.SparseGEMV.initialize("sparse_gemv", device_type).operator(True)
        ff.gemv2 = kernels.SparseGEMV.initialize("sparse_gemv", device_type).operator(True)
        ff.thresh_gate = ff.thresh_up = t["gate_up"]
        ff.thresh_down = t["down"]
        ff.sparsity_bin = 0
        attn.gemv1 = kernels.SparseQKVGEMV.initialize("sparse_qkv_gemv", device_type).operator(True)
        attn.gemv2 = kernels.SparseGEMV.initialize("sparse_gemv", device_type).operator(True)
        attn.thresh_q = attn.thresh_k = attn.thresh_v = t["qkv"]
        attn.thresh_o = t["o"]
        attn.sparsity_bin = 0
        for lin in (ff.w1, ff.w3, ff.w2, attn.wqkv, attn.wo):
            lin.weight.data = lin.weight.data.T.contiguous().T  # column major, as TEAL's kernels read it
        ff.apply_monkeypatch()
        attn.apply_monkeypatch()
    return model


def measure(label: str, build, prompt, a) -> dict:
    """One row: the model built, timed as bench_decode times it; a failure is recorded, not raised, so the other
    rows still run."""
    model = decode_fn = None
    try:
        model = build()
        model.setup_caches(max_batch_size=1, max_seq_length=a.prompt_tokens + a.new_tokens)
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        timing, _ = time_decode(model, decode_fn, prompt, a.new_tokens, a.runs)
        row = {"label": label, **timing}
        print(f"{label}: {timing['tok_s']:.1f} tok/s, {timing['decode_ms_per_token']:.3f} ms per decode token",
              flush=True)
    except Exception as e:  # an anchor that does not run at these shapes or on this torch
        row = {"label": label, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        print(f"{label}: failed, {row['error'][:300]}", flush=True)
    finally:
        model = decode_fn = None
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


@user_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt_fast", type=Path, required=True, help="your clone of pytorch-labs/gpt-fast")
    p.add_argument("--teal", type=Path, required=True, help="your clone of FasterDecoding/TEAL")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=["gpt-fast", "teal", "teal-fast", "teal-fast-dense"],
                   choices=["gpt-fast", "teal", "teal-fast", "teal-fast-dense"], help="what to time for each model")
    p.add_argument("--sparsity", type=fraction(0, MAX_SPARSITY, low_open=True), default=0.5)
    p.add_argument("--prompt_tokens", type=positive_int, default=5)
    p.add_argument("--new_tokens", type=positive_int, default=200)
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/anchors-<device>.json; PNG beside)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the anchors time GPU decoding and need CUDA")
    torch._inductor.config.coordinate_descent_tuning = True  # GPT-Fast's setting, and this project's
    device, dtype = "cuda", torch.bfloat16
    gpt_fast = load_module("gpt_fast_model", a.gpt_fast / "model.py")
    # TEAL's model.py imports its kernels as kernels.sparse_gemv: loaded under that name first, the import finds the
    # clone's kernels rather than another installed package called kernels.
    teal_kernels = load_module("kernels.sparse_gemv", a.teal / "kernels" / "sparse_gemv.py")
    teal = load_module("teal_gpt_fast_model", a.teal / "gpt-fast" / "model.py")
    max_seq = a.prompt_tokens + a.new_tokens
    prompt = torch.randint(0, 32000, (a.prompt_tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "triton": _triton_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmark.anchors " + " ".join(sys.argv[1:] if argv is None else argv),
              "gpt_fast": _commit(a.gpt_fast), "teal": _commit(a.teal), "dtype": "bfloat16", "sparsity": a.sparsity,
              "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "runs": a.runs,
              "copy_GBps": copy_bandwidth(device, 1 << 30), "models": []}
    out = a.out or REPO / "benchmark" / "results" / f"anchors-{props.name.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        def build_teal():
            model = anchor_model(teal, MODELS[name], device, dtype, max_seq)
            return teal_sparsify(model, teal_kernels, teal_thresholds(model, a.sparsity, max_seq), "cuda")

        def build_ours(sparse: bool):
            model = random_model(name, device=device, dtype=dtype)
            entry["dense_weight_bytes"] = weight_bytes(model)["total"]
            if sparse:
                sparsify(model)
                set_uniform(model, calibrate_on_random_prefill(model, [a.sparsity])[a.sparsity])
                model.setup_caches(1, max_seq, exact=True)
            return model
        builds = {"gpt-fast": ("GPT-Fast dense", lambda: anchor_model(gpt_fast, MODELS[name], device, dtype, max_seq)),
                  "teal": (f"TEAL's code {a.sparsity:.0%}", build_teal),
                  "teal-fast": (f"teal-fast {a.sparsity:.0%}", lambda: build_ours(True)),
                  "teal-fast-dense": ("teal-fast dense", lambda: build_ours(False))}
        entry = {"model": name, "rows": []}
        result["models"].append(entry)
        for key in a.rows:
            entry["rows"].append(measure(builds[key][0], builds[key][1], prompt, a))
            write_result(result, out)  # after every row: a run stopped early keeps what it measured
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def _commit(clone: Path) -> str | None:
    """The clone's checked-out commit, read from its .git (no git process)."""
    head = clone / ".git" / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
        target = clone / ".git" / ref[5:]
        return target.read_text().strip() if target.is_file() else ref[5:]
    return ref


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["label"] for m in result["models"] for r in m["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, m in enumerate(result["models"]):
            row = next((r for r in m["rows"] if r["label"] == label and "tok_s" in r), None)
            if row:
                xs.append(i + j * width)
                ys.append(row["tok_s"])
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(result["models"]))])
    ax.set_xticklabels([m["model"] for m in result["models"]])
    ax.set_ylabel("decode tokens/s (batch 1, 200 new tokens)")
    ax.set_title(f"{result['device']}, bf16, random weights, CUDA graphs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
