"""Perplexity under TEAL sparsity, scored the way decoding sparsifies.

    python -m benchmark.perplexity                         # default SmolLM2 on WikiText-2's test split (streamed)
    python -m benchmark.perplexity --data text.txt --methods dense uniform --targets 0.5   # a local text file
    python -m benchmark.perplexity --int8 --methods dense greedy    # int8 weights (per-output-channel scales)
    python -m benchmark.perplexity --int4 --methods dense greedy    # 4-bit weights, groups of 128, zero points
    python -m benchmark.perplexity --checkpoint_path checkpoints/SmolLM2-135M-Instruct-Q4_1   # the GGUF's own Q4_1

Protocol: `--windows` non-overlapping windows of `--window` tokens spread evenly over the text (no BOS).
The first `--prompt` tokens of each window are a dense prefill; the rest are scored, each position
masked exactly as a decode step masks it (mask_prefill: per token, |x| > threshold, all seven
projections). The first scored token is predicted by the dense prefill, as the first generated token is.

Methods: dense; uniform, greedy, weight-aware and allocated (greedy's allocation across blocks) from the model's
threshold file (with their held calibration where the file has it, so the realised sparsity stays on target);
uniform-dense, TEAL's own thresholds (quantiles of dense activations) for comparison with published numbers;
cats, CATS's MLP-only sparsity at --cats_targets (the share of SiLU(gate) activations dropped; attention dense),
whose model-wide sparsity is about half the target on Llama shapes: compare it with TEAL at --targets of that size,

    python -m benchmark.perplexity --methods dense cats uniform greedy --cats_targets 0.5 0.7 --targets 0.25 0.35

Realised sparsity is the parameter-weighted fraction of masked inputs over the scored positions, over all seven
projections (realized_sparsity) and over the MLP's three (mlp_sparsity).
"""
import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark.common import write_result
from cli import add_int4_args, fraction, int4_quant, positive_int, user_errors
from model import load_model
from sparse import SparsityMeter, catsify, set_mask_prefill, sparse_layers, sparsify
from thresholds.calibrate import add_text_source, read_tokens
from thresholds.file import MAX_SPARSITY, ThresholdFile, apply_thresholds, default_thresholds
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
# Evaluation text, as the TEAL paper evaluates: WikiText-2 (raw), its test split.
DEFAULT_DATASET = "Salesforce/wikitext:wikitext-2-raw-v1:test"
METHODS = ("dense", "uniform", "greedy", "weight-aware", "allocated", "uniform-dense", "cats")


def window_starts(n_tokens: int, windows: int, window: int) -> list[int]:
    """Starts of `windows` non-overlapping windows spread evenly over n_tokens tokens."""
    if n_tokens < windows * window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than {windows} windows x {window}; "
                         "lower --windows or --window, or use a longer text")
    step = (n_tokens - window) / max(windows - 1, 1)
    return [round(i * step) for i in range(windows)]


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, prompt: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[prompt:] given a dense prefill of ids[:prompt] and masked
    (decode-sparse) forwards of the rest; returns (nll, scored tokens)."""
    n = ids.numel()
    pos = torch.arange(n, device=ids.device)
    logits_first = model(ids[None, :prompt], pos[:prompt])[0, -1:]
    set_mask_prefill(model, True)
    try:
        logits_rest = model(ids[None, prompt:-1], pos[prompt:-1])[0]
    finally:
        set_mask_prefill(model, False)
    logits = torch.cat([logits_first, logits_rest]).float()
    nll = torch.nn.functional.cross_entropy(logits, ids[prompt:].long(), reduction="sum")
    return float(nll), n - prompt


def evaluate(model, windows: list[torch.Tensor], prompt: int, desc: str) -> dict:
    meter = SparsityMeter(model)
    nll, count = 0.0, 0
    try:
        for ids in tqdm(windows, desc=desc, leave=False):
            a, b = window_nll(model, ids, prompt)
            nll, count = nll + a, count + b
    finally:
        meter.close()
    return {"ppl": math.exp(nll / count), "realized_sparsity": meter.model_sparsity(), "mlp_sparsity": meter.mlp_sparsity()}


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--thresholds", type=Path, help="threshold file (default: the checkpoint folder's "
                   "thresholds.safetensors if it has one, else the shipped thresholds/<model>.safetensors)")
    add_text_source(p, "evaluation text", DEFAULT_DATASET)
    p.add_argument("--windows", type=positive_int, default=16)
    p.add_argument("--window", type=positive_int, default=1024)
    p.add_argument("--prompt", type=positive_int, default=512, help="dense tokens at the start of each window")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help=f"default: all of {', '.join(METHODS)} (see above)")
    p.add_argument("--targets", type=fraction(0, MAX_SPARSITY), nargs="+", default=[0.25, 0.4, 0.5, 0.65])
    p.add_argument("--cats_targets", type=fraction(0, MAX_SPARSITY), nargs="+", default=[0.5, 0.7],
                   help="targets of method cats: the share of each MLP's intermediate activations dropped")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--int8", action="store_true", help="int8 weights (per-output-channel scales) in the seven projections, "
                   "for every method ('dense' then runs them with thresholds 0)")
    add_int4_args(p)
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/perplexity-<model>.json; a PNG beside it)")
    a = p.parse_args(argv)
    int4 = int4_quant(a)
    if "cats" in a.methods and (a.int8 or int4):
        raise SystemExit("method cats keeps the model's weight dtype; drop --int8 / --int4 or the method")
    if not 0 < a.prompt < a.window:
        raise SystemExit(f"--prompt {a.prompt} must be between 0 and --window {a.window}")
    dtype = getattr(torch, a.dtype)

    dense = load_model(a.checkpoint_path, device=a.device, dtype=dtype)
    stored = next((layer.group_quant for _, _, layer in sparse_layers(dense)), None)  # a quantized checkpoint's format
    if stored is not None and (a.int8 or int4):
        raise SystemExit(f"{a.checkpoint_path} stores its projections quantized already: run it without --int4 / --int8")
    if a.int8 or int4:
        sparsify(dense, int8=a.int8, group_quant=int4)
    name = dense.config.name
    tf_path = a.thresholds or default_thresholds(a.checkpoint_path, name)
    tf = ThresholdFile.load(tf_path, dense.config) if set(a.methods) - {"dense"} else None
    missing = [m for m in a.methods if m != "dense" and ("uniform" if m == "uniform-dense" else m) not in tf.modes()]
    if missing:
        raise SystemExit(f"{tf_path} has no tables for {missing} (it has {tf.modes()}); add them with "
                         f"`python -m thresholds.calibrate --from_file {tf_path} --no_allocation --out {tf_path}` "
                         "(with --data FILE to calibrate on a local text offline)")
    tokenizer = load_tokenizer(a.checkpoint_path)
    ids, source = read_tokens(tokenizer, a.data, a.dataset)
    windows = [ids[s:s + a.window].to(a.device) for s in window_starts(ids.numel(), a.windows, a.window)]

    rows = []
    models = {}
    for method in a.methods:
        for target in ([0.0] if method == "dense" else a.cats_targets if method == "cats" else a.targets):
            if method == "dense":
                model = dense
            elif method == "cats":
                if "cats" not in models:
                    models["cats"] = catsify(load_model(a.checkpoint_path, device=a.device, dtype=dtype))
                model = models["cats"]
                apply_thresholds(model, tf, target, "cats")
            else:
                per_channel = method == "weight-aware"
                if per_channel not in models:
                    models[per_channel] = sparsify(load_model(a.checkpoint_path, device=a.device, dtype=dtype), per_channel,
                                                   int8=a.int8, group_quant=int4)
                model = models[per_channel]
                mode = "uniform" if method == "uniform-dense" else method
                apply_thresholds(model, tf, target, mode, held=method != "uniform-dense")
            model.setup_caches(1, a.window)
            r = evaluate(model, windows, a.prompt, f"{method} {target}")
            rows.append({"method": method, "target_sparsity": target, **r})
            print(f"{method:>13} {target:.2f}: ppl {r['ppl']:.3f}, realised sparsity {r['realized_sparsity']:.3f} "
                  f"(MLP {r['mlp_sparsity']:.3f})", flush=True)

    result = {"model": name, "data": source, "window": a.window, "prompt_tokens": a.prompt,
              "windows": a.windows, "scored_tokens": a.windows * (a.window - a.prompt), "dtype": a.dtype, "int8": a.int8,
              "group_quant": vars(int4 or stored) if int4 or stored else None, "quantized_checkpoint": stored is not None,
              "calibration_tokens": tf.provenance.get("tokens") if tf else None,
              "thresholds": str(tf_path) if tf else None, "date": datetime.date.today().isoformat(),
              "command": "python -m benchmark.perplexity " + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}
    out = a.out or REPO / "benchmark" / "results" / f"perplexity-{name}.json"
    write_result(result, out, plot)
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in result["rows"] if r["method"] == "dense"]
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "dense"):
        rs = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["realized_sparsity"])
        ax.plot([r["realized_sparsity"] for r in rs], [r["ppl"] for r in rs], "o-", label=method)
    if dense:
        ax.axhline(dense[0]["ppl"], color="gray", ls="--", label=f"dense {dense[0]['ppl']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("realised activation sparsity (parameter-weighted)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{result['model']}, {Path(result['data']).name}, {result['scored_tokens']} scored tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
