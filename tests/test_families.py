"""Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k norms, a head size of its own) and Llama-3.2 (tied embeddings, Llama-3
RoPE scaling): logits against transformers, conversion of HF folders and GGUF files, tokenizers, sparse decoding against
a masked PyTorch reference (eager, compiled, tensor parallel), and the CLIs on each family."""
import copy
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convert_hf_checkpoint import convert_gguf, convert_hf_folder
from generate import generate
from model import ModelArgs, Transformer, load_model
from sparse import set_thresholds, sparsify
from tests.test_model import assert_logits_match_hf
from tests.test_sparse import masked_reference, thresholds_at
from tokenizer import LLAMA3_PATTERN, QWEN2_PATTERN, load_tokenizer

VOCAB = 320  # the 256 byte symbols, some merges and the special tokens of the test tokenizers
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]  # Qwen3's added tokens that are not special (user-defined in a GGUF)
SPECIAL = {"qwen2": CHATML_SPECIAL, "qwen3": CHATML_SPECIAL,
           "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# transformers classes by name, imported where used: the tensor-parallel test's workers import this module
FAMILIES = {
    # head_dim 24 with hidden 64 and 4 heads: Qwen3's head size is not hidden / heads
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6, head_dim=24)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
}
TEXT = ("The capital of France is Paris. In 1889 the Eiffel Tower opened; it is 330 metres tall.\n"
        "Qwen and Llama models tokenize text like this: don't, won't, 12345 numbers, symbols {}[]!\n") * 4


def make_tokenizer(family: str):
    """A small byte-level BPE trained on TEXT with the family's pre-tokenizer, as its real tokenizer.json has it
    (Qwen: the Qwen2 split pattern and NFC; Llama-3: its pattern and a BOS token added by the post-processor)."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN if family == "llama" else QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if family != "llama":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    added = [] if family == "llama" else THINK
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(added), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL[family], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    return tok


def tiny_hf(tmp_path, family: str, n_head=4, n_kv=2):
    """A transformers model of the family with random weights, its biases and norm weights random too (transformers
    makes them 0 and 1), saved with a tokenizer as a Hugging Face folder."""
    import transformers
    config_name, model_name, extra = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=128, **extra)
    hf = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    folder = tmp_path / family
    hf.save_pretrained(folder, safe_serialization=True)
    tok = make_tokenizer(family)
    tok.save(str(folder / "tokenizer.json"))
    eos, stop = (("<|end_of_text|>", "<|eot_id|>") if family == "llama" else ("<|endoftext|>", "<|im_end|>"))
    config = {"bos_token": "<|begin_of_text|>" if family == "llama" else None, "eos_token": eos,
              "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(eos),
                                                                                tok.token_to_id(stop)]}))
    return hf, folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_full_sequence_and_kv_cache(tmp_path, family):
    hf, folder = tiny_hf(tmp_path, family)
    model = load_model(convert_hf_folder(folder, tmp_path / "converted", "float32"), dtype=torch.float32)
    assert (model.config.qkv_bias, model.config.qk_norm, model.config.tie_embeddings) == \
        (family == "qwen2", family == "qwen3", family == "llama")
    assert_logits_match_hf(model, hf, VOCAB)


def write_gguf(folder, path, family: str):
    """A GGUF of the HF folder as llama.cpp's convert_hf_to_gguf.py writes one: for qwen2/qwen3 the q/k tensors in
    HF's (rotate-half) order, for llama permuted to interleaved pairs; the tokenizer as gpt2-style BPE fields."""
    import gguf
    from safetensors.torch import load_file
    from convert_hf_checkpoint import permute_for_interleaved_rope
    cfg = json.loads((folder / "config.json").read_text())
    hf = load_file(folder / "model.safetensors")
    tok = json.loads((folder / "tokenizer.json").read_text())
    arch = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}[family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{family}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or cfg  # transformers 5 writes rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if family == "qwen3":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    vocab = sorted({**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(),
                   key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    user_defined = {t["content"] for t in tok["added_tokens"] if not t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if family == "llama" else "qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 4 if t in user_defined else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    names = [t for t, _ in vocab]
    if family == "llama":
        w.add_bos_token_id(names.index("<|begin_of_text|>"))
        w.add_add_bos_token(True)
        w.add_eos_token_id(names.index("<|eot_id|>"))
    else:
        w.add_eos_token_id(names.index("<|im_end|>"))
        w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def add(name, t):
        w.add_tensor(name, t.float().numpy())
    add("token_embd.weight", hf["model.embed_tokens.weight"])
    add("output_norm.weight", hf["model.norm.weight"])
    if rope.get("rope_type") == "llama3":  # llama.cpp's rope_freqs: one divisor per frequency
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        old, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                                  rope["high_freq_factor"], rope["factor"])
        factors = []
        for f in freqs:
            wavelen = 2 * np.pi / f
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 if wavelen < old / high else factor if wavelen > old / low
                           else 1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    if "lm_head.weight" in hf and not cfg.get("tie_word_embeddings"):
        add("output.weight", hf["lm_head.weight"])
    heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"]}
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for x in "qkv":
            t = hf[f"{p}self_attn.{x}_proj.weight"]
            permute = family == "llama" and x != "v"
            add(f"{b}attn_{x}.weight", permute_for_interleaved_rope(t, heads[x]) if permute else t)
            if family == "qwen2":
                add(f"{b}attn_{x}.bias", hf[f"{p}self_attn.{x}_proj.bias"])
        if family == "qwen3":
            add(f"{b}attn_q_norm.weight", hf[p + "self_attn.q_norm.weight"])
            add(f"{b}attn_k_norm.weight", hf[p + "self_attn.k_norm.weight"])
        for ours, theirs in (("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                             ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            add(f"{b}{ours}.weight", hf[f"{p}{theirs}.weight"])
        add(f"{b}attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"{b}ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_folder_and_gguf_convert_and_decode_as_transformers(tmp_path, family):
    from tokenizers import Tokenizer
    hf, folder = tiny_hf(tmp_path, family)
    write_gguf(folder, tmp_path / "tiny.gguf", family)
    reference_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "In 1889 the tower's 330 metres: don't split  numbers 12345!\nCafe\u0301 {}<think>\n\n</think>\n<|im_end|>"
    for out in (convert_hf_folder(folder, tmp_path / "from-hf", "float32"),
                convert_gguf(tmp_path / "tiny.gguf", tmp_path / "from-gguf", "float32")):
        tok = load_tokenizer(out)
        # the same ids as the tokenizer.json transformers runs (Llama-3's BOS included, from its post-processor)
        assert tok.encode(text) == reference_tok.encode(text).ids
        plain = reference_tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text, bos=False)) == reference_tok.decode(plain, skip_special_tokens=False)
        stop = {"llama": ["<|end_of_text|>", "<|eot_id|>"], "qwen2": ["<|endoftext|>", "<|im_end|>"]}
        assert set(tok.stop_ids) >= {reference_tok.token_to_id(t) for t in stop.get(family, stop["qwen2"])} - \
            ({reference_tok.token_to_id("<|end_of_text|>"), reference_tok.token_to_id("<|endoftext|>")}
             if out.name == "from-gguf" else set())  # a GGUF names one EOS; the turn's end token is added
        assert tok.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        model = load_model(out, dtype=torch.float32)
        prompt = torch.tensor(tok.encode("The capital of France"), dtype=torch.int)
        new = generate(model, prompt, 16, temperature=0)[0, prompt.numel():].tolist()
        ref = hf.generate(prompt.long().view(1, -1), attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert new == ref[0, prompt.numel():].tolist(), out.name


def tiny_family_model(family: str, seed=0, n_head=4, n_local_heads=2) -> Transformer:
    """The family's features on a tiny ModelArgs model, every parameter random (biases and q/k norm weights too)."""
    flags = {"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True, head_dim=24),
             "llama": dict(tie_embeddings=True, rope_base=500000.0, rope_scaling=FAMILIES["llama"][2]["rope_scaling"])}
    flags = copy.deepcopy(flags[family])
    if "rope_scaling" in flags:
        flags["rope_scaling"] = {k: v for k, v in flags["rope_scaling"].items() if k != "rope_type"}
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(vocab_size=96, n_layer=2, n_head=n_head, n_local_heads=n_local_heads, dim=64,
                              intermediate_size=96, block_size=128, **flags)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_decode_matches_masked_reference_eager_and_compiled(family):
    dense = tiny_family_model(family)
    table = thresholds_at(dense, 0.5)
    ref = masked_reference(dense, table)
    sparse = sparsify(copy.deepcopy(dense))
    set_thresholds(sparse, table)
    wqkv = sparse.layers[0].attention.wqkv
    assert (wqkv.bias is not None) == (family == "qwen2")
    # q/k/v of biased or normed models are summed in the compiled graph, not handed to the attention op as partials
    assert wqkv.decode_partials == ("keep" if family == "llama" else "add")
    prompt = torch.tensor([5, 17, 42, 7], dtype=torch.int)
    tokens = generate(sparse, prompt, 24, temperature=0)
    assert torch.equal(tokens, generate(ref, prompt, 24, temperature=0))
    step = torch.compile(lambda m, x, p: m(x, p), fullgraph=True)
    for m in (sparse, ref):
        m.setup_caches(1, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        sparse(tokens[:, :4], torch.arange(4))
        ref(tokens[:, :4], torch.arange(4))
        for pos in range(4, 12):
            tok, p = tokens[:, pos:pos + 1], torch.tensor([pos])
            want = ref(tok, p)
            assert (step(sparse, tok, p) - want).abs().max() < 1e-4  # fp32, compiled: the order of additions differs
    torch._dynamo.reset()
    # int8 weights (per-output-channel scales, the bias kept in the model's dtype) against the masked reference of the
    # dense model holding the dequantized weights
    from sparse import quantize_int8
    dequantized = copy.deepcopy(dense)
    with torch.no_grad():
        for block in dequantized.layers:
            for lin in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2):
                q, scales = quantize_int8(lin.weight)
                lin.weight.copy_(q.float() * scales[:, None])
    int8 = sparsify(copy.deepcopy(dense), int8=True)
    set_thresholds(int8, table)
    assert torch.equal(generate(int8, prompt, 24, temperature=0),
                       generate(masked_reference(dequantized, table), prompt, 24, temperature=0))
    # and the masking is real: the sparse model's logits differ from the dense model's
    dense.setup_caches(1, 64)
    with torch.no_grad():
        prefill = sparse(tokens[:, :8], torch.arange(8)) - dense(tokens[:, :8], torch.arange(8))
        assert prefill.abs().max() < 1e-5  # prefill stays dense
        sparse.setup_caches(1, 64)
        dense.setup_caches(1, 64)
        sparse(tokens[:, :4], torch.arange(4))
        dense(tokens[:, :4], torch.arange(4))
        assert (sparse(tokens[:, 4:5], torch.tensor([4])) - dense(tokens[:, 4:5], torch.tensor([4]))).abs().max() > 1e-3


def tp_worker(rank, world, port, family, result_path):
    from tp import apply_tp, shutdown_dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = sparsify(tiny_family_model(family, 5, n_head=8, n_local_heads=4))
    set_thresholds(m, thresholds_at(tiny_family_model(family, 5, n_head=8, n_local_heads=4), 0.5))
    apply_tp(m)
    attn = m.layers[0].attention
    # this rank's heads: 4 of 8 query heads, 2 of 4 KV heads, their biases with them; the norm weights whole
    assert attn.n_local_heads == 2 and attn.qkv_sizes == (4 * attn.head_dim, 2 * attn.head_dim, 2 * attn.head_dim)
    assert attn.wqkv.bias is None or attn.wqkv.bias.shape == (8 * attn.head_dim,)
    assert attn.q_norm is None or attn.q_norm.weight.shape == (attn.head_dim,)
    m.setup_caches(1, 32)
    with torch.no_grad():
        m(torch.tensor([[3, 9, 27]]), torch.arange(3))
        logits = [m(torch.tensor([[t]]), torch.tensor([3 + i])) for i, t in enumerate([81, 5, 60, 11])]
    if rank == 0:
        torch.save(torch.cat(logits, 1), result_path)
    shutdown_dist()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sparse_tensor_parallel_matches_masked_reference(tmp_path, family):
    # gloo, 2 ranks: q/k/v biases split with their heads, q/k norms replicated, KV heads split
    dense = tiny_family_model(family, 5, n_head=8, n_local_heads=4)
    ref = masked_reference(dense, thresholds_at(dense, 0.5))
    ref.setup_caches(1, 32)
    with torch.no_grad():
        ref(torch.tensor([[3, 9, 27]]), torch.arange(3))
        want = torch.cat([ref(torch.tensor([[t]]), torch.tensor([3 + i])) for i, t in enumerate([81, 5, 60, 11])], 1)
    path = tmp_path / "logits.pt"
    mp.spawn(tp_worker, args=(2, 29620 + ["qwen2", "qwen3"].index(family), family, str(path)), nprocs=2, join=True)
    assert (torch.load(path, weights_only=True) - want).abs().max() < 1e-4  # fp32; the all-reduce reorders sums


def test_qwen25_7b_widths_on_the_h100_tiles_with_masked_columns():
    # Qwen2.5-7B's widths (3584 = 7 x 512, 18944 = 37 x 512) are whole numbers of the H100 configs' K slices; each
    # layer's real K and H100 config (132 SMs; the predicated kernel, the default below 70%) runs under the interpreter,
    # its column groups cut to a strip and a part so the column mask is taken too, against the float64 masked product.
    from sparse_gemv.kernels import pick_config, sparse_gemv_triton
    from sparse_gemv.ops import sparse_gemv_reference
    c = ModelArgs.from_name("qwen2.5-7b")
    kv = c.n_local_heads * c.head_dim
    layers = {"qkv": (c.dim, (c.dim, kv, kv)), "o": (c.dim, (c.dim,)),
              "gate/up": (c.dim, (c.intermediate_size,) * 2), "down": (c.intermediate_size, (c.dim,))}
    for name, (k, groups) in layers.items():
        for reduce in (True, False):
            config = pick_config(k, groups, False, 132, reduce)
            cut = [config["BLOCK_N"] + 8] * len(groups)
            g = torch.Generator().manual_seed(k + len(groups))
            x = torch.randn(1, k, generator=g)
            w = torch.randn(k, sum(cut), generator=g) / k ** 0.5
            thr = torch.full((len(groups),), float(x.abs().quantile(0.5)))
            ref = sparse_gemv_reference(x.double(), w.double(), thr.double(), cut)
            y = sparse_gemv_triton(x, w, thr, cut, config=config, reduce=reduce)
            y = y if reduce else y.sum(0)
            assert (y.double() - ref).abs().max() < 1e-4, (name, reduce)  # fp32 sums over up to 18944 products


@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibrate_perplexity_and_chat_on_each_family(tmp_path, family, monkeypatch, capsys):
    # The CLIs end to end on a converted checkpoint of the family (the tiny tokenizer turns the wiki text into about
    # one token per two bytes): thresholds calibrated on the calibration text, perplexity on the evaluation text
    # (realised sparsity near its target), and a sparse greedy chat through the chat template until stdin ends.
    from benchmark import perplexity
    from generate import main as generate_main
    from tests.conftest import TEXT_DATA
    from thresholds import calibrate
    _, folder = tiny_hf(tmp_path, family)
    ckpt = convert_hf_folder(folder, tmp_path / "ckpt", "float32")
    tf = tmp_path / "thresholds.safetensors"
    calibrate.main(["--checkpoint_path", str(ckpt), "--out", str(tf),
                    "--data", str(TEXT_DATA / "wiki-calibration.txt"), "--tokens", "1024", "--seq_len", "128",
                    "--greedy_tokens", "32", "--greedy_step", "0.1", "--allocation_tokens", "128",
                    "--held_targets", "0.5", "--held_tokens", "1024"])
    out = tmp_path / "ppl.json"
    perplexity.main(["--checkpoint_path", str(ckpt), "--thresholds", str(tf),
                     "--data", str(TEXT_DATA / "wiki-evaluation.txt"), "--windows", "2", "--window", "128",
                     "--prompt", "64", "--methods", "dense", "uniform", "allocated", "--targets", "0.5",
                     "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(np.isfinite(r["ppl"]) for r in rows.values()) and rows["dense"]["realized_sparsity"] == 0
    for method in ("uniform", "allocated"):
        assert abs(rows[method]["realized_sparsity"] - 0.5) < 0.1, method
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nWhat is 2+2?\n"))
    generate_main(["--checkpoint_path", str(ckpt), "--interactive", "--max_new_tokens", "6", "--temperature", "0",
                   "--sparsity", "0.5", "--thresholds", str(tf)])
    stdout = capsys.readouterr().out
    assert stdout.count("You: ") == 3 and stdout.count("tokens/s") == 3  # two answers, the end of stdin, the median
    assert "realised activation sparsity" in stdout


def test_named_configs_are_the_published_config_json():
    # The shapes of Qwen2.5-7B, Qwen3-8B and Llama-3.2-1B/3B as their config.json files publish them
    llama32 = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                   tie_word_embeddings=True, max_position_embeddings=131072, num_key_value_heads=8,
                   intermediate_size=8192,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    published = {
        "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                           intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                           max_position_embeddings=32768),
        "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                         intermediate_size=12288,
                         num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                         max_position_embeddings=40960),
        "llama-3.2-1b": dict(llama32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
        "llama-3.2-3b": dict(llama32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    }
    for name, cfg in published.items():
        assert ModelArgs.from_hf_config(cfg, name=name) == ModelArgs.from_name(name), name
    with pytest.raises(ValueError, match="attention_bias"):
        ModelArgs.from_hf_config({**published["qwen3-8b"], "attention_bias": True})
    with pytest.raises(ValueError, match="sliding-window"):
        ModelArgs.from_hf_config({**published["qwen2.5-7b"], "use_sliding_window": True})
