"""Downstream-task accuracy under sparsity, through EleutherAI's lm-evaluation-harness (PyPI `lm_eval`).

    python -m benchmark.downstream --sparsities 0 0.5 --sparsity_mode greedy            # the six default tasks
    python -m benchmark.downstream --sparsities 0.5 --sparsity_mode cats --tasks piqa --limit 200
    python -m benchmark.downstream --include_path my_tasks/ --tasks my_task                # local YAML tasks

The default tasks follow the TEAL paper's six-task aggregate (MMLU, ARC-Challenge, HellaSwag, GSM8K, PIQA,
WinoGrande); their datasets come from the Hugging Face hub, so they need network (a local YAML task over a JSON
file runs anywhere, as tests/test_downstream.py's do). lm_eval's own CLI cannot name this model without a plugin
layer, so this module runs the harness through its Python API (lm_eval.simple_evaluate with a TealFastLM).

Scoring is decode-faithful, as benchmark.perplexity's: the context is a dense prefill; every continuation token is
computed as a decode step computes it (mask_prefill: each position masked per token, the same thresholds), so a
multiple-choice score cannot look better than the text the sparse model would generate. generate_until runs
generate.generate, the real decode loop of single-token sparse steps (--compile: CUDA graphs, as generate.py).
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from benchmark.common import write_result
from cli import fraction, non_negative_int, positive_float, positive_int, user_errors
from generate import decode_one_token, generate, load_sparse_model, resolve_device
from model import ModelArgs, checkpoint_folder
from sparse import set_mask_prefill
from thresholds.file import MAX_SPARSITY, MODES
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = ("mmlu", "arc_challenge", "hellaswag", "gsm8k", "piqa", "winogrande")


class TealFastLM(LM):
    """An lm_eval model over a converted checkpoint, dense (sparsity 0) or sparse in any --sparsity_mode."""

    def __init__(self, checkpoint_path=None, sparsity: float = 0.0, sparsity_mode: str = "uniform",
                 thresholds=None, device: str = "auto", dtype: str = "auto", max_length: int = 2048,
                 compile: bool = False):
        super().__init__()
        from convert_hf_checkpoint import DEFAULT_CHECKPOINT
        checkpoint = Path(checkpoint_path or DEFAULT_CHECKPOINT)
        device = resolve_device(device)
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}.get(dtype) or getattr(torch, dtype)
        self.model, _ = load_sparse_model(checkpoint, device, dtype, float(sparsity), sparsity_mode,
                                          Path(thresholds) if thresholds else None)
        self.tokenizer = load_tokenizer(checkpoint)
        self._device = device
        self.max_length = min(int(max_length), self.model.config.block_size)
        # The token an empty context starts from, as lm_eval's HF model does: BOS, else the end-of-text token.
        self.prefix_id = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.stop_ids[0]
        self.decode_fn = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
                          if str(compile).lower() in ("1", "true") else decode_one_token)
        self.model.setup_caches(1, self.max_length)  # once: generate keeps caches that are big enough
        self._prefilled = (None, None)  # (context ids, logits after them) of the last dense prefill

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and the continuation, split where the tokenizer splits their concatenation
        (a trailing space of the context moves to the continuation, as lm_eval's HF model does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """log p(cont | ctx) and whether cont is the greedy continuation: a dense prefill of ctx (its last logits
        predict cont[0]), then cont[:-1] in one forward masked as decode steps mask (mask_prefill)."""
        if not cont:
            raise ValueError("lm_eval asked to score an empty continuation")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        ctx = (ctx or [self.prefix_id])[-(self.max_length - len(cont) + 1):]
        n = len(ctx)
        if self._prefilled[0] != ctx:  # the choices of one question share their context: prefill it once
            logits = self.model(torch.tensor([ctx], device=self.device), torch.arange(n, device=self.device))
            self._prefilled = (ctx, logits[0, -1])
        logits = [self._prefilled[1][None]]
        if len(cont) > 1:
            # positions after the context: the KV cache keeps the prefill's entries for positions < n
            set_mask_prefill(self.model, True)
            try:
                logits.append(self.model(torch.tensor([cont[:-1]], device=self.device),
                                         torch.arange(n, n + len(cont) - 1, device=self.device))[0])
            finally:
                set_mask_prefill(self.model, False)
        logp = torch.log_softmax(torch.cat(logits).float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._score(*self._encode_pair(*r.args)) for r in tqdm(requests, desc="loglikelihood",
                                                                          disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tokenizer.encode(r.args[0], bos=False)
            windows = get_rolling_token_windows(ids, self.prefix_id, self.max_length, context_len=1)
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = r.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            # at least one context token stays: the cache holds max_length positions, prompt and new tokens
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = (self.tokenizer.encode(context) or [self.prefix_id])[-(self.max_length - max_new):]
            self._prefilled = (None, None)  # generate's prefill and steps overwrite the cache
            seq = generate(self.model, torch.tensor(ids, dtype=torch.int, device=self.device), max_new,
                           stop_ids=self.tokenizer.stop_ids, decode_fn=self.decode_fn, temperature=temperature,
                           top_k=kwargs.pop("top_k", None))
            new = [t for t in seq[0, len(ids):].tolist() if t not in self.tokenizer.stop_ids]
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main_metric(task_result: dict) -> tuple[str, float]:
    """The headline number of one task's results: acc_norm, acc or exact_match (first filter), else the first."""
    for name in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
                 "exact_match,none"):
        if name in task_result:
            return name, float(task_result[name])
    name = next(k for k, v in task_result.items() if isinstance(v, (int, float)) and "stderr" not in k)
    return name, float(task_result[name])


@user_errors
def main(argv=None):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--sparsities", type=fraction(0, MAX_SPARSITY), nargs="+", default=[0.0, 0.5],
                   help="0 is the dense model")
    p.add_argument("--sparsity_mode", default="greedy", choices=MODES)
    p.add_argument("--thresholds", type=Path, help="threshold file (default: the checkpoint folder's "
                   "thresholds.safetensors if it has one, else the shipped thresholds/<model>.safetensors)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--include_path", type=Path, help="a folder of lm_eval task YAML files")
    p.add_argument("--num_fewshot", type=non_negative_int, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=positive_float, help="documents per task (a fraction below 1)")
    p.add_argument("--max_length", type=positive_int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--compile", action="store_true", help="generation tasks decode in CUDA graphs")
    p.add_argument("--out", type=Path, help="JSON file (default benchmark/results/downstream-<model>.json; a PNG beside)")
    a = p.parse_args(argv)
    if a.include_path is not None and not a.include_path.is_dir():
        raise SystemExit(f"--include_path {a.include_path} is not a folder of task YAML files")
    if not (Path(a.checkpoint_path) / "model.safetensors").exists() and a.checkpoint_path == DEFAULT_CHECKPOINT:
        from convert_hf_checkpoint import main as convert
        convert([])
    # lm_eval's own tasks are indexed only when a task needs them (indexing them takes about half a minute)
    task_manager = TaskManager(include_path=str(a.include_path), include_defaults=False) if a.include_path else None
    if task_manager is None or set(a.tasks) - set(task_manager.all_tasks):
        task_manager = TaskManager(include_path=str(a.include_path) if a.include_path else None)
    unknown = [t for t in a.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; `lm_eval ls tasks` lists them, --include_path adds local YAML ones")

    rows = []
    for s in a.sparsities:
        lm = TealFastLM(a.checkpoint_path, s, a.sparsity_mode, a.thresholds, a.device, a.dtype, a.max_length,
                        a.compile)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(a.tasks), num_fewshot=a.num_fewshot, limit=a.limit,
                                      task_manager=task_manager, log_samples=False, bootstrap_iters=0)
        mode = "dense" if s == 0 else a.sparsity_mode
        for task, r in res["results"].items():
            metric, value = main_metric(r)
            rows.append({"task": task, "sparsity": s, "mode": mode, "metric": metric, "value": value,
                         "results": {k: v for k, v in r.items() if isinstance(v, (int, float, str))}})
            print(f"{mode:>12} {s:.2f} {task}: {metric} {value:.4f}", flush=True)
        del lm
    name = ModelArgs.load(checkpoint_folder(a.checkpoint_path) / "model_config.json").name  # made safe for a path
    result = {"model": name, "tasks": a.tasks, "num_fewshot": a.num_fewshot, "limit": a.limit,
              "sparsity_mode": a.sparsity_mode, "lm_eval": lm_eval.__version__, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "command": "python -m benchmark.downstream " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    out = a.out or REPO / "benchmark" / "results" / f"downstream-{name}.json"
    write_result(result, out, plot)
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
    runs = list(dict.fromkeys((r["mode"], r["sparsity"]) for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) * len(runs) / 2), 4))
    width = 0.8 / len(runs)
    for j, (mode, s) in enumerate(runs):
        values = {r["task"]: r["value"] for r in result["rows"] if (r["mode"], r["sparsity"]) == (mode, s)}
        ax.bar([i + j * width for i in range(len(tasks))], [values.get(t, 0.0) for t in tasks], width,
               label="dense" if mode == "dense" else f"{mode} {s:g}")
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("score (acc_norm / acc / exact match)")
    ax.set_title(f"{result['model']}, lm-evaluation-harness {result['lm_eval']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
