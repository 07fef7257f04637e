"""Untrusted model files and bad input (issue 32): chat templates run no code, names from files never become paths,
the converter replaces only what it wrote, threshold files and option values are checked, the kernel launcher checks
its inputs, and every bad file or value ends the command with a clear message, exit status non-zero and files as they
were. Models here are tiny and random, written in a temporary folder."""
import functools
import hashlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_hf_checkpoint
import generate
from benchmark import anchors, bench_cpu_decode, bench_decode, bench_persistent, perplexity
from convert_hf_checkpoint import convert_gguf, convert_hf_folder
from model import ModelArgs, config_hash, load_model
from sparse_gemv import sparse_gemv_reference
from sparse_gemv.kernels import sparse_gemv_triton
from thresholds import calibrate
from thresholds.calibrate import LEVELS
from thresholds.file import SHIPPED, ThresholdFile, default_thresholds
from tokenizer import load_tokenizer

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 48, 2, 4, 2, 64
WORDS = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris", "a", "city", "hi"]
SAFE_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def downstream_main(argv=None):
    """benchmark.downstream's CLI, imported when called: it needs lm_eval, which machines running only the GPU tests
    (which import this module's helpers through test_model) need not have."""
    from benchmark import downstream
    return downstream.main(argv)


def evil_template(marker: Path) -> str:
    """A chat template that, rendered by a plain jinja2 Environment, runs a shell command creating `marker`."""
    return "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}" + SAFE_TEMPLATE


def write_word_tokenizer(folder: Path, chat_template: str | None = SAFE_TEMPLATE) -> None:
    """A word-level tokenizer.json over WORDS and its tokenizer_config.json, as a Hugging Face folder has them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def hf_tensors(vocab=VOCAB, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    head_dim = DIM // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, DIM), "model.norm.weight": (DIM,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HEADS * head_dim, DIM),
                       p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, DIM),
                       p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, DIM),
                       p + "self_attn.o_proj.weight": (DIM, HEADS * head_dim),
                       p + "mlp.gate_proj.weight": (HIDDEN, DIM), p + "mlp.up_proj.weight": (HIDDEN, DIM),
                       p + "mlp.down_proj.weight": (DIM, HIDDEN),
                       p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,)})
    return {k: torch.randn(s, generator=g) * 0.2 if len(s) == 2 else torch.ones(s) for k, s in shapes.items()}


def tiny_hf_folder(folder: Path, chat_template: str | None = SAFE_TEMPLATE, tensors: dict | None = None,
                   **config) -> Path:
    """A Hugging Face Llama folder (config.json, model.safetensors, tokenizer) with tiny random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": DIM,
        "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "torch_dtype": "float32", **config}))
    save_file(hf_tensors() if tensors is None else tensors, str(folder / "model.safetensors"))
    write_word_tokenizer(folder, chat_template)
    return folder


def tiny_gguf(path: Path, basename: str = "tiny", chat_template: str | None = None, vocabulary: bool = True,
              block_count: int | str = LAYERS) -> Path:
    """A llama GGUF with tiny random float32 weights and a byte-level BPE vocabulary (no merges); without the
    vocabulary, or with a block count of the wrong type (a string), it is damaged."""
    import gguf
    from tokenizers import pre_tokenizers
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["th", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_basename(basename)
    w.add_size_label("135M")
    if isinstance(block_count, str):
        w.add_string("llama.block_count", block_count)
    else:
        w.add_block_count(block_count)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    if vocabulary:
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["t h"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    g = torch.Generator().manual_seed(0)

    def add(name, *shape):
        w.add_tensor(name, (torch.randn(shape, generator=g) * 0.2 if len(shape) == 2 else torch.ones(shape)).numpy())
    add("token_embd.weight", len(tokens), DIM)
    add("output_norm.weight", DIM)
    for i in range(LAYERS):
        b = f"blk.{i}."
        add(b + "attn_q.weight", DIM, DIM)
        add(b + "attn_k.weight", DIM // HEADS * KV_HEADS, DIM)
        add(b + "attn_v.weight", DIM // HEADS * KV_HEADS, DIM)
        add(b + "attn_output.weight", DIM, DIM)
        add(b + "ffn_gate.weight", HIDDEN, DIM)
        add(b + "ffn_up.weight", HIDDEN, DIM)
        add(b + "ffn_down.weight", DIM, HIDDEN)
        add(b + "attn_norm.weight", DIM)
        add(b + "ffn_norm.weight", DIM)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_thresholds(args: ModelArgs, **tables) -> dict:
    """The tensors of a valid uniform-mode threshold file for a model (sorted random quantiles), overridable."""
    g = torch.Generator().manual_seed(0)
    site = torch.rand(args.n_layer, 4, len(LEVELS), generator=g).sort(-1).values
    return {"levels": LEVELS.clone(), "site_quantiles": site, **tables}


def save_thresholds(path: Path, args: ModelArgs, tensors: dict) -> Path:
    meta = {"format": "teal-thresholds/1", "model": args.name, "config_hash": config_hash(args), "provenance": "{}"}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def snapshot(*roots: Path) -> dict:
    """Every file under roots with a hash of its bytes: equal snapshots mean nothing was written or removed."""
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for root in roots for f in sorted(Path(root).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny checkpoint (named hardening-tiny), a threshold file for it, and calibration text."""
    root = tmp_path_factory.mktemp("tiny")
    ckpt = convert_hf_folder(tiny_hf_folder(root / "hf" / "hardening-tiny"), root / "hardening-tiny", "float32")
    args = ModelArgs.load(ckpt / "model_config.json")
    thresholds = save_thresholds(root / "thresholds.safetensors", args, tiny_thresholds(args))
    text = root / "text.txt"
    text.write_text(" ".join(WORDS[3:] * 40))
    return {"root": root, "ckpt": ckpt, "args": args, "thresholds": thresholds, "text": text}


def run(main, *argv) -> None:
    main([str(a) for a in argv])


def fail(main, argv, capsys) -> str:
    """Run a script's main in-process; it must exit non-zero. Returns what it said (its exit message or stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code not in (0, None)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return e.value.code if isinstance(e.value.code, str) else stderr  # ours, or argparse's


# 1. Chat templates from model files are rendered sandboxed.

def test_chat_template_from_hf_folder_runs_no_code(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    ckpt = convert_hf_folder(tiny_hf_folder(tmp_path / "hf", evil_template(marker)), tmp_path / "ckpt", "float32")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    said = fail(generate.main, ["--checkpoint_path", ckpt, "--interactive", "--max_new_tokens", 2, "--temperature", 0],
                capsys)
    assert not marker.exists()
    assert "chat template" in said and str(ckpt) in said and "SecurityError" in said


def test_chat_template_from_gguf_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = convert_gguf(tiny_gguf(tmp_path / "m.gguf", chat_template=evil_template(marker)), tmp_path / "ckpt")
    tok = load_tokenizer(ckpt)
    with pytest.raises(ValueError, match="chat template of .*cannot be used"):
        tok.chat_prompt("hi")
    assert not marker.exists()
    # a template that only formats the messages still renders
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    assert tok.chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>"


# 2. Names read from model files never become paths.

def test_model_names_from_files_stay_inside_their_folders(tmp_path, monkeypatch):
    evil = "../../hardening-escape"
    escapes = [SHIPPED / f"{evil}-135m.safetensors"]  # where the unfixed calibrate wrote
    monkeypatch.chdir(tmp_path)
    try:
        convert_hf_checkpoint.main(["--gguf", str(tiny_gguf(tmp_path / "evil.gguf", basename=evil))])
        ckpt = tmp_path / "checkpoints" / "evil"  # the converter's folder: from the file name
        name = ModelArgs.load(ckpt / "model_config.json").name
        assert name == "hardening-escape-135m"
        # a model_config.json written by hand is made safe as it is read
        config = json.loads((ckpt / "model_config.json").read_text())
        assert ModelArgs(**{**config, "name": "../../x/.hidden"}).name == "x-.hidden"
        # generate.py's and perplexity's default threshold file
        assert default_thresholds(ckpt, name) == SHIPPED / "hardening-escape-135m.safetensors"
        # calibrate's default output
        (tmp_path / "text.txt").write_text("the capital of France is Paris. " * 20)
        run(calibrate.main, "--checkpoint_path", ckpt, "--data", tmp_path / "text.txt", "--tokens", 64, "--seq_len", 32,
            "--no_greedy", "--held_targets")
        assert ThresholdFile.load(ckpt / "thresholds.safetensors").model == name
        # perplexity's default --out
        monkeypatch.setattr(perplexity, "REPO", tmp_path / "repo")
        perplexity.main(["--checkpoint_path", str(ckpt), "--data", str(tmp_path / "text.txt"), "--windows", "2",
                         "--window", "16", "--prompt", "8", "--methods", "dense", "uniform", "--targets", "0.5"])
        results = tmp_path / "repo" / "benchmark" / "results"
        assert sorted(p.name for p in results.iterdir()) == [f"perplexity-{name}.json", f"perplexity-{name}.png"]
        assert not any(p.exists() for p in escapes)
    finally:
        for p in escapes:
            p.unlink(missing_ok=True)


def test_downstream_results_named_safely(tmp_path, monkeypatch):
    from benchmark import downstream
    from tests.test_downstream import write_tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ckpt = convert_gguf(tiny_gguf(tmp_path / "evil.gguf"), tmp_path / "ckpt")
    config = json.loads((ckpt / "model_config.json").read_text())
    (ckpt / "model_config.json").write_text(json.dumps({**config, "name": "../../hardening-escape-135m"}))  # by hand
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    monkeypatch.setattr(downstream, "REPO", tmp_path / "repo")
    import lm_eval.tasks  # only the local task: indexing all of lm_eval's takes longer
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    run(downstream.main, "--checkpoint_path", ckpt, "--tasks", "teal_mc", "--include_path", tmp_path / "tasks",
        "--sparsities", 0, "--max_length", 64, "--device", "cpu")
    results = tmp_path / "repo" / "benchmark" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["downstream-hardening-escape-135m.json",
                                                         "downstream-hardening-escape-135m.png"]


# 3. The converter replaces only a fresh folder or a checkpoint it wrote.

def test_convert_from_dot_and_dotdot_deletes_nothing(tmp_path, monkeypatch):
    hf = tiny_hf_folder(tmp_path / "mymodel")
    (hf / "notes").mkdir()
    (hf / "notes" / "mine.txt").write_text("keep me")
    other = convert_hf_folder(tiny_hf_folder(tmp_path / "other"), hf / "checkpoints" / "other", "float32")
    before = snapshot(hf)
    monkeypatch.chdir(hf / "notes")  # `..` is the model folder: the output once was checkpoints/.., this folder
    convert_hf_checkpoint.main(["--checkpoint_dir", ".."])
    assert (hf / "notes" / "mine.txt").read_text() == "keep me"
    load_model(hf / "notes" / "checkpoints" / "mymodel")
    monkeypatch.chdir(hf)  # `.` once made the output checkpoints/ itself, removing every other converted model
    convert_hf_checkpoint.main(["--checkpoint_dir", "."])
    load_model(hf / "checkpoints" / "mymodel")
    load_model(other)
    after = snapshot(hf)
    assert {k: v for k, v in after.items() if k in before} == before  # new files only


def test_convert_refuses_folders_it_did_not_write(tmp_path, monkeypatch, capsys):
    hf = tiny_hf_folder(tmp_path / "mymodel")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for out in (mine, hf, tmp_path):  # someone's folder, the input itself, a folder holding the input
        said = fail(convert_hf_checkpoint.main, ["--checkpoint_dir", hf, "--out_dir", out], capsys)
        assert "refusing to write" in said and str(out) in said
    assert snapshot(tmp_path) == before


# 4. Re-conversion keeps the old checkpoint until the new one is in place.

def test_reconversion_keeps_old_checkpoint_until_new_is_in(tmp_path, monkeypatch):
    out = convert_hf_folder(tiny_hf_folder(tmp_path / "hf"), tmp_path / "ckpt", "float32")
    (out / "thresholds.safetensors").write_bytes(b"a user's calibration")
    old = snapshot(out)
    real_replace = os.replace

    def killed_at_swap(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("simulated kill while swapping the new checkpoint in")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_swap)
    with pytest.raises(OSError, match="simulated kill"):
        convert_hf_folder(tmp_path / "hf", out, "float32")
    assert snapshot(out) == old  # still the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary folder left
    monkeypatch.setattr(os, "replace", real_replace)
    save_file(hf_tensors(seed=1), str(tmp_path / "hf" / "model.safetensors"))
    convert_hf_folder(tmp_path / "hf", out, "float32")
    assert (out / "thresholds.safetensors").read_bytes() == b"a user's calibration"  # not the converter's to remove
    assert snapshot(out)[str(out / "model.safetensors")] != old[str(out / "model.safetensors")]


def _convert_after_barrier(barrier, hf, out):
    # both processes have written their files before either swaps them in
    real_save = convert_hf_checkpoint.save_file

    def save_then_wait(*args, **kwargs):
        real_save(*args, **kwargs)
        barrier.wait(timeout=60)
    convert_hf_checkpoint.save_file = save_then_wait
    convert_hf_folder(hf, out, "float32")


def test_concurrent_conversions_into_one_folder_both_end_cleanly(tmp_path):
    hf = tiny_hf_folder(tmp_path / "hf")
    out = tmp_path / "ckpt"
    convert_hf_folder(hf, out, "float32")  # an old checkpoint to replace
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_convert_after_barrier, args=(barrier, hf, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


# 5. Threshold files are checked when loaded; option values that cannot work are refused when parsed.

@pytest.mark.parametrize("change, table", [
    (lambda t: t["site_quantiles"].__setitem__((0, 1, 5), float("nan")), "site_quantiles"),
    (lambda t: t.update(greedy_targets=torch.linspace(0, 0.9, 91), greedy_sparsities=torch.zeros(91, 3, 7)),
     "greedy_sparsities"),  # a layer count that is not the file's
    (lambda t: t.update(levels=LEVELS[:-1]), "site_quantiles"),  # level counts disagree
    (lambda t: t.update(score_quantiles=torch.zeros(2, 4, len(LEVELS))), "score_quantiles"),
    (lambda t: t.update(greedy_targets=torch.linspace(0, 0.9, 91), greedy_sparsity=torch.zeros(91, 2, 7)),
     "greedy_sparsity"),  # renamed
    (lambda t: t.pop("site_quantiles"), "site_quantiles"),  # missing
    (lambda t: t.update(held_targets=torch.tensor([0.5])), "held_targets"),  # no held tables
    (lambda t: t.update(held_targets=torch.tensor([0.5]), held_uniform=torch.full((1, 2, 7), float("inf"))),
     "held_uniform"),
])
def test_threshold_files_are_checked_on_load(tmp_path, tiny, change, table):
    tensors = tiny_thresholds(tiny["args"])
    change(tensors)
    path = save_thresholds(tmp_path / "t.safetensors", tiny["args"], tensors)
    with pytest.raises(ValueError) as e:
        ThresholdFile.load(path, tiny["args"])
    assert str(path) in str(e.value) and repr(table) in str(e.value)


def test_calibrate_refuses_step_zero_before_any_work(capsys):
    for step in ("0", "-0.04", "nan", "inf"):
        said = fail(calibrate.main, ["--checkpoint_path", "no/such/checkpoint", "--greedy_step", step], capsys)
        assert "--greedy_step" in said


# 6. The converter accepts only what can load.

def test_convert_refuses_shapes_the_config_contradicts(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(HIDDEN + 1, DIM)
    hf = tiny_hf_folder(tmp_path / "hf", tensors=tensors)
    with pytest.raises(ValueError, match=r"layers.1.feed_forward.w13.weight has shape \(97, 32\).*needs \(96, 32\)"):
        convert_hf_folder(hf, tmp_path / "ckpt")
    hf = tiny_hf_folder(tmp_path / "hf2", vocab_size=VOCAB * 2)
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(64, 32\).*vocab 128"):
        convert_hf_folder(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_convert_names_the_missing_tokenizer(tmp_path):
    hf = tiny_hf_folder(tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json or tokenizer.model: copy it from"):
        convert_hf_folder(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# 7. A calibration goes beside its checkpoint; the shipped files are replaced only when asked.

def test_calibration_goes_to_the_checkpoint_not_the_package(tmp_path, tiny):
    ckpt = tmp_path / "hardening-tiny"
    ckpt.mkdir()
    for f in tiny["ckpt"].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    shipped = snapshot(SHIPPED)
    assert default_thresholds(ckpt, "smollm2-135m") == SHIPPED / "smollm2-135m.safetensors"  # shipped, if none own
    try:
        run(calibrate.main, "--checkpoint_path", ckpt, "--data", tiny["text"], "--tokens", 64, "--seq_len", 32,
            "--no_greedy", "--held_targets")
        assert snapshot(SHIPPED) == shipped
        own = ckpt / "thresholds.safetensors"
        assert default_thresholds(ckpt, tiny["args"].name) == own
        model, tf = generate.load_sparse_model(ckpt, "cpu", torch.float32, 0.5, "uniform", None)
        assert torch.equal(tf.site_quantiles, ThresholdFile.load(own).site_quantiles)
    finally:
        (SHIPPED / "hardening-tiny.safetensors").unlink(missing_ok=True)  # where the unfixed code wrote


# 8. The exported kernel launcher checks its inputs.

@pytest.mark.parametrize("case", ["k-mismatch", "x-strided", "negative-split", "split-k-0", "out-shape", "9-tokens"])
def test_kernel_launcher_checks_its_inputs(case):
    g = torch.Generator().manual_seed(0)
    k, n = 64, 48
    x, w = torch.randn(2, k, generator=g), torch.randn(k, n, generator=g)
    thr, groups, kwargs = torch.zeros(1), [n], {}
    if case == "k-mismatch":
        w = torch.randn(k + 16, n, generator=g)
    elif case == "x-strided":
        x = torch.randn(k, 2, generator=g).t()
    elif case == "negative-split":
        thr, groups = torch.zeros(2), [n + 16, -16]
    elif case == "split-k-0":
        kwargs = {"config": {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 0, "COMPACT": False, "STAGES": 1}}
    elif case == "out-shape":
        kwargs = {"out": torch.empty(2, n + 1)}
    else:
        x = torch.randn(9, k, generator=g)
    with pytest.raises(ValueError, match="sparse_gemv: "):
        sparse_gemv_triton(x, w, thr, groups, **kwargs)


def test_kernel_launcher_still_computes_checked_inputs():
    g = torch.Generator().manual_seed(0)
    x, w, thr = torch.randn(2, 64, generator=g), torch.randn(64, 48, generator=g), torch.tensor([0.5, 0.7])
    y = sparse_gemv_triton(x, w, thr, [16, 32])
    assert torch.allclose(y, sparse_gemv_reference(x, w, thr, [16, 32]), atol=1e-4)  # fp32, 1e-4 absolute


# Clear errors instead of tracebacks: each case exits non-zero, names the problem and leaves the files as they were.

def _broken_checkpoint(tiny, tmp, change):
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    for f in tiny["ckpt"].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    change(ckpt)
    return ckpt


def _truncate(path: Path, size: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if size is None else size])


def _drop_tensor(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state.pop("layers.1.feed_forward.w2.weight")
    save_file(state, str(ckpt / "model.safetensors"))


def _gguf(tmp, change):
    path = tiny_gguf(tmp / "m.gguf")
    change(path)
    return path


def _hf(tmp, change=lambda folder: None, **config):
    folder = tiny_hf_folder(tmp / "hf", **config)
    change(folder)
    return folder


def _to_corrupt_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle" * 8)


def _drop_hf_tensor(folder):
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(folder / "model.safetensors"))


BINARY = bytes(range(256)) * 8
# (script, argv from (tiny, tmp), what the message must name). "{ckpt}" etc. are filled from tiny.
CLI_CASES = {
    "generate: missing checkpoint": (generate.main, lambda t, d: ["--checkpoint_path", d / "missing"],
                                     "no converted checkpoint in"),
    "generate: --max_new_tokens 0": (generate.main, lambda t, d: ["--max_new_tokens", "0"], "--max_new_tokens"),
    "generate: --max_new_tokens -1": (generate.main, lambda t, d: ["--max_new_tokens", "-1"], "--max_new_tokens"),
    "generate: --batch_size 0": (generate.main, lambda t, d: ["--batch_size", "0"], "--batch_size"),
    "generate: --batch_size -1": (generate.main, lambda t, d: ["--batch_size", "-1"], "--batch_size"),
    "generate: --prompt ''": (generate.main, lambda t, d: ["--prompt", ""], "--prompt"),
    "generate: --num_samples 0": (generate.main, lambda t, d: ["--num_samples", "0"], "--num_samples"),
    "generate: --sparsity 1.5": (generate.main, lambda t, d: ["--sparsity", "1.5"], "--sparsity"),
    "generate: --temperature nan": (generate.main, lambda t, d: ["--temperature", "nan"], "--temperature"),
    "generate: truncated model.safetensors": (
        generate.main, lambda t, d: ["--checkpoint_path", _broken_checkpoint(
            t, d, lambda c: _truncate(c / "model.safetensors"))], "model.safetensors is not a readable"),
    "generate: missing tensor": (
        generate.main, lambda t, d: ["--checkpoint_path", _broken_checkpoint(t, d, _drop_tensor)],
        "layers.1.feed_forward.w2.weight"),
    "generate: invalid model_config.json": (
        generate.main, lambda t, d: ["--checkpoint_path", _broken_checkpoint(
            t, d, lambda c: (c / "model_config.json").write_text("{"))], "model_config.json is not a model config"),
    "generate: NaN thresholds": (
        generate.main, lambda t, d: ["--checkpoint_path", t["ckpt"], "--sparsity", "0.5", "--thresholds",
                                     save_thresholds(d / "nan.safetensors", t["args"], tiny_thresholds(
                                         t["args"], site_quantiles=torch.full((LAYERS, 4, len(LEVELS)), float("nan"))))],
        "nan.safetensors: table 'site_quantiles' holds NaN"),
    "generate: renamed threshold table": (
        generate.main, lambda t, d: ["--checkpoint_path", t["ckpt"], "--sparsity", "0.5", "--thresholds",
                                     save_thresholds(d / "renamed.safetensors", t["args"], {
                                         "levels": LEVELS, "site_quantile": torch.zeros(LAYERS, 4, len(LEVELS))})],
        "renamed.safetensors: table 'site_quantile' is not one"),
    "calibrate: --seq_len 0": (calibrate.main, lambda t, d: ["--seq_len", "0"], "--seq_len"),
    "calibrate: --tokens -100": (calibrate.main, lambda t, d: ["--tokens", "-100"], "--tokens"),
    "calibrate: --greedy_step -0.1": (calibrate.main, lambda t, d: ["--greedy_step", "-0.1"], "--greedy_step"),
    "calibrate: --greedy_step nan": (calibrate.main, lambda t, d: ["--greedy_step", "nan"], "--greedy_step"),
    "calibrate: binary --data": (
        calibrate.main, lambda t, d: ["--checkpoint_path", t["ckpt"], "--out", d / "out.safetensors", "--data",
                                      (d / "bin.txt", (d / "bin.txt").write_bytes(BINARY))[0]], "bin.txt is not UTF-8"),
    "perplexity: --windows 0": (perplexity.main, lambda t, d: ["--windows", "0"], "--windows"),
    "perplexity: binary --data": (
        perplexity.main, lambda t, d: ["--checkpoint_path", t["ckpt"], "--methods", "dense", "--out", d / "p.json",
                                       "--data", (d / "bin.txt", (d / "bin.txt").write_bytes(BINARY))[0]],
        "bin.txt is not UTF-8"),
    "bench_decode: --runs 0": (bench_decode.main, lambda t, d: ["--runs", "0"], "--runs"),
    "bench_cpu_decode: --sparsity 1": (bench_cpu_decode.main, lambda t, d: ["--sparsity", "1"], "--sparsity"),
    "bench_persistent: --sparsities 1.5": (bench_persistent.main, lambda t, d: ["--sparsities", "1.5"],
                                           "--sparsities"),
    "bench_persistent: --programs_per_sm 0": (bench_persistent.main, lambda t, d: ["--programs_per_sm", "0"],
                                              "--programs_per_sm"),
    "bench_persistent: --tile_kb -64": (bench_persistent.main, lambda t, d: ["--tile_kb", "-64"], "--tile_kb"),
    "anchors: --runs 0": (anchors.main, lambda t, d: ["--runs", "0"], "--runs"),
    "anchors: --new_tokens -1": (anchors.main, lambda t, d: ["--new_tokens", "-1"], "--new_tokens"),
    "anchors: --sparsity 0": (anchors.main, lambda t, d: ["--sparsity", "0"], "--sparsity"),
    "downstream: --num_fewshot -1": (downstream_main, lambda t, d: ["--num_fewshot", "-1"], "--num_fewshot"),
    "downstream: --limit -5": (downstream_main, lambda t, d: ["--limit", "-5"], "--limit"),
    "downstream: --limit nan": (downstream_main, lambda t, d: ["--limit", "nan"], "--limit"),
    "convert: truncated safetensors in an HF folder": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, lambda f: _truncate(
            f / "model.safetensors")), "--out_dir", d / "out"], "model.safetensors is not a readable weight file"),
    "convert: corrupt pytorch_model.bin": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, _to_corrupt_bin), "--out_dir", d / "out"],
        "pytorch_model.bin is damaged or holds more than tensors"),
    "convert: truncated GGUF": (
        convert_hf_checkpoint.main, lambda t, d: ["--gguf", _gguf(d, _truncate), "--out_dir", d / "out"],
        "m.gguf is not a readable GGUF file"),
    "convert: GGUF of only its magic": (
        convert_hf_checkpoint.main,
        lambda t, d: ["--gguf", _gguf(d, lambda p: _truncate(p, 4)), "--out_dir", d / "out"],
        "m.gguf is not a readable GGUF file"),
    "convert: GGUF without vocabulary": (
        convert_hf_checkpoint.main, lambda t, d: ["--gguf", tiny_gguf(d / "m.gguf", vocabulary=False), "--out_dir",
                                                  d / "out"], "m.gguf lacks the metadata tokenizer.ggml.tokens"),
    "convert: GGUF block count of text": (
        convert_hf_checkpoint.main, lambda t, d: ["--gguf", tiny_gguf(d / "m.gguf", block_count="two"), "--out_dir",
                                                  d / "out"], "metadata llama.block_count is 'two', not a positive"),
    "convert: invalid config.json": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, lambda f: (f / "config.json").write_text(
            "{'not': json")), "--out_dir", d / "out"], "config.json is not valid JSON"),
    "convert: gpt2 config without architectures": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, architectures=None, model_type="gpt2"),
                                                  "--out_dir", d / "out"],
        "unsupported architecture \"model_type 'gpt2'\""),
    "convert: missing tensor": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, _drop_hf_tensor), "--out_dir", d / "out"],
        "hf: no tensor 'model.layers.0.mlp.up_proj.weight'"),
    "convert: unknown torch_dtype": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, torch_dtype="float8"), "--out_dir",
                                                  d / "out"], "torch_dtype 'float8' is not one of"),
    "convert: no tokenizer": (
        convert_hf_checkpoint.main, lambda t, d: ["--checkpoint_dir", _hf(d, lambda f: (f / "tokenizer.json").unlink()),
                                                  "--out_dir", d / "out"], "has no tokenizer.json or tokenizer.model"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_errors_are_clear_and_change_nothing(case, tiny, tmp_path, monkeypatch, capsys):
    main, make_argv, expected = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)  # a default output, were one written, would land here
    argv = make_argv(tiny, tmp_path)
    before = snapshot(tmp_path, tiny["root"])
    said = fail(main, argv, capsys)
    message = said[said.index("error:"):]  # after argparse's usage lines, if any
    assert expected in message and len(message.strip().splitlines()) <= 3, said
    assert snapshot(tmp_path, tiny["root"]) == before


@pytest.mark.parametrize("script, args, expected", [
    ("generate.py", ["--checkpoint_path", "missing"], "error: no converted checkpoint in missing"),
    ("convert_hf_checkpoint.py", ["--gguf", "m.gguf", "--out_dir", "out"], "error: m.gguf is not a readable GGUF file"),
])
def test_cli_errors_in_a_subprocess_have_no_traceback(tmp_path, script, args, expected):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # only the magic
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / script), *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and expected in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
