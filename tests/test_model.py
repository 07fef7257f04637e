"""Logit parity with Hugging Face transformers, and conversion of a transformers-written checkpoint."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from convert_hf_checkpoint import convert_hf_folder
from model import ModelArgs, load_model
from tests.test_hardening import write_word_tokenizer

CONFIGS = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama31-rope": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
}


def tiny_hf(tmp_path, name):
    config_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, rms_norm_eps=1e-5, **extra)
    hf = model_cls(cfg).float().eval()
    folder = tmp_path / name
    hf.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder)
    return hf, folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_full_sequence_and_kv_cache(tmp_path, name):
    hf, folder = tiny_hf(tmp_path, name)
    out = convert_hf_folder(folder, tmp_path / f"{name}-converted", "float32")
    model = load_model(out, dtype=torch.float32)
    assert_logits_match_hf(model, hf, vocab=128)


def assert_logits_match_hf(model, hf, vocab: int) -> None:
    """40 random tokens: the full sequence and token by token through the KV cache, against transformers' logits."""
    idx = torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        model.setup_caches(1, 64)
        full = model(idx, torch.arange(40))
        assert (full - ref).abs().max() <= 1e-4  # stated tolerance: float32, 1e-4 absolute
        model.setup_caches(1, 64)
        steps = torch.cat([model(idx[:, i:i + 1], torch.tensor([i])) for i in range(40)], dim=1)
        assert (steps - ref).abs().max() <= 1e-4


def test_setup_caches_keeps_a_big_enough_cache_unless_exact():
    from tests.test_sparse import tiny_model
    m = tiny_model(2)
    m.setup_caches(1, 64)
    cache = m.layers[0].attention.kv_cache.k_cache
    m.setup_caches(1, 32)
    assert m.layers[0].attention.kv_cache.k_cache is cache  # GPT-Fast: a bigger cache serves a shorter run
    m.setup_caches(1, 32, exact=True)
    assert m.layers[0].attention.kv_cache.k_cache.shape[2] == 32 and m.max_seq_length == 32
    assert m.causal_mask.shape == (32, 32) and m.freqs_cis.shape[0] == 32


def test_config_from_hf_and_errors(tmp_path):
    hf, folder = tiny_hf(tmp_path, "llama31-rope")
    import json
    cfg = json.loads((folder / "config.json").read_text())
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_scaling["factor"] == 8.0 and args.n_local_heads == 2
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelArgs.from_hf_config({**cfg, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(FileNotFoundError, match="convert_hf_checkpoint") as missing_folder:
        load_model(tmp_path / "missing")
    assert f"no converted checkpoint in {tmp_path / 'missing'} " in str(missing_folder.value)  # not its parent
    with pytest.raises(FileNotFoundError, match="convert_hf_checkpoint") as missing_file:
        load_model(tmp_path / "model.safetensors")
    assert f"no converted checkpoint in {tmp_path} " in str(missing_file.value)  # the file's folder
    with pytest.raises(ValueError, match="unknown model config"):
        ModelArgs.from_name("llama-9-1t")
    assert ModelArgs.from_name("llama-3-70b").n_local_heads == 8


def test_top_k_sampling_matches_masked_softmax():
    """sample() draws among the top k logits only; its frequencies must match the reference definition
    (logits under the k-th largest set to -inf, softmax at the temperature) within 0.01 per token over
    40,000 draws (standard error at most 0.0025), and no token outside the top k is ever drawn."""
    from generate import sample
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    k, temperature = 5, 0.7
    ref = torch.softmax(torch.where(logits < logits.topk(k).values[-1], -float("inf"), logits) / temperature, -1)
    draws = sample(logits.expand(40_000, 1, 50), temperature, k).flatten()
    freq = torch.bincount(draws.long(), minlength=50).double() / draws.numel()
    assert set(draws.unique().tolist()) <= set(logits.topk(k).indices.tolist())
    assert (freq - ref.double()).abs().max() < 0.01
    greedy = sample(logits.view(1, 1, 50), 0.0, k)
    assert int(greedy) == int(logits.argmax())
