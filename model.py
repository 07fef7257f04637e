"""A Llama-family decoder in plain PyTorch, in the spirit of GPT-Fast.

Static shapes everywhere a decode step touches (KV cache, causal mask, RoPE table), so
torch.compile(mode="reduce-overhead") captures one decode step as a CUDA graph.
RoPE is applied to interleaved (even, odd) pairs, as in GPT-Fast and GGUF files; the
HF converter permutes q/k weights (and their biases and norm weights) into that layout once.
Llama-2/3/3.1/3.2, Mistral and SmolLM2 are this decoder as it stands; Qwen2/2.5 add biases to q, k and v, and Qwen3
a per-head RMSNorm on q and k before RoPE (with a head size of its own).
"""
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import cached_attention, decode_step_attention


def safe_name(name: str) -> str:
    """A name read from a model file (GGUF metadata, a folder name, model_config.json) reduced to one safe path
    component: letters, digits, '.', '_' and '-' only, no leading dot or dash, so never '..', a folder or hidden."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).lstrip(".-")[:100].rstrip(".-")
    return name or "model"


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 11008
    n_local_heads: int = -1  # key/value heads; -1 means n_head (no grouped-query attention)
    head_dim: int = -1  # -1 means dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: dict | None = None  # Llama-3.1 style {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_freq_factors: list[float] | None = None  # that scaling as GGUF files store it: a divisor per frequency
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3: a per-head RMSNorm on q and k before RoPE
    name: str = "custom"

    def __post_init__(self):
        self.name = safe_name(self.name)  # it names files (thresholds, results): never a path of its own
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower()
        if key not in CONFIGS:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(name=key, **CONFIGS[key])

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "custom") -> "ModelArgs":
        """Build from a Hugging Face config.json dict: Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5 or Qwen3."""
        model_type = config.get("model_type", "llama")
        # no architectures: the model_type's, where it is one of ours (a gpt2 config is not a Llama)
        default = next((a for a, t in HF_ARCHITECTURES.items() if a.lower().startswith(model_type)),
                       f"model_type {model_type!r}")
        arch = (config.get("architectures") or [default])[0]
        if arch not in HF_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}: only {', '.join(HF_ARCHITECTURES)}")
        missing = [k for k in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                               "intermediate_size") if k not in config]
        if missing:
            raise ValueError(f"the config lacks {', '.join(missing)}")
        scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default", "llama3"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}: only Llama-3.1 ('llama3') scaling")
        family = HF_ARCHITECTURES[arch]
        if config.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        if config.get("attention_bias") or config.get("mlp_bias"):  # Llama's and Qwen3's put one on o too
            raise ValueError(f"{arch} with attention_bias or mlp_bias is not supported (biases only on Qwen2's q, k, v)")
        rope_base = config.get("rope_theta", scaling.get("rope_theta", 10000.0))
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return cls(
            name=name,
            block_size=config.get("max_position_embeddings", 2048),
            vocab_size=config["vocab_size"],
            n_layer=config["num_hidden_layers"],
            n_head=config["num_attention_heads"],
            dim=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            n_local_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            rope_base=float(rope_base),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_scaling={k: scaling[k] for k in keys} if rope_type == "llama3" else None,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a model config this code wrote ({e}); "
                             "re-run convert_hf_checkpoint.py") from e


# Hugging Face architectures and the GGUF architecture names of the same models
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3"}
_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}
CONFIGS = {
    "llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, dim=4096, intermediate_size=11008),
    "llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, dim=5120, intermediate_size=13824),
    "llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672),
    "llama-3-8b": dict(block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, rope_base=500000.0),
    "llama-3-70b": dict(block_size=8192, vocab_size=128256, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                        intermediate_size=28672, rope_base=500000.0),
    "llama-3.1-8b": dict(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                         intermediate_size=14336, rope_base=500000.0, rope_scaling=_LLAMA31_SCALING),
    "llama-3.1-70b": dict(block_size=131072, vocab_size=128256, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                          intermediate_size=28672, rope_base=500000.0, rope_scaling=_LLAMA31_SCALING),
    "mistral-7b": dict(block_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336),
    "llama-3.2-1b": dict(block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_local_heads=8, dim=2048,
                         intermediate_size=8192, rope_base=500000.0, rope_scaling=_LLAMA32_SCALING,
                         tie_embeddings=True),
    "llama-3.2-3b": dict(block_size=131072, vocab_size=128256, n_layer=28, n_head=24, n_local_heads=8, dim=3072,
                         intermediate_size=8192, rope_base=500000.0, rope_scaling=_LLAMA32_SCALING,
                         tie_embeddings=True),
    "qwen2.5-7b": dict(block_size=32768, vocab_size=152064, n_layer=28, n_head=28, n_local_heads=4, dim=3584,
                       intermediate_size=18944, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True),
    "qwen3-8b": dict(block_size=40960, vocab_size=151936, n_layer=36, n_head=32, n_local_heads=8, dim=4096,
                     head_dim=128, intermediate_size=12288, rope_base=1000000.0, norm_eps=1e-6, qk_norm=True),
    "smollm2-135m": dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_local_heads=3, dim=576,
                         intermediate_size=1536, rope_base=100000.0, tie_embeddings=True),
}


def config_hash(args: ModelArgs) -> str:
    """Identity of a model's shapes, stored in threshold files so they cannot be applied to another model."""
    import hashlib
    # the family flags count only when on, so the files of models from before them keep matching
    shape = {k: v for k, v in asdict(args).items()
             if k not in ("name", "block_size") and not (k in ("qkv_bias", "qk_norm", "rope_freq_factors") and not v)}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


class KVCache(nn.Module):
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """One layer's caches [max_batch_size, n_heads, max_seq_length, head_dim]: views of the model's stacked ones."""
        super().__init__()
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, exact: bool = False):
        """Static KV caches for max_seq_length positions: kept if big enough already (as GPT-Fast does), or made
        exactly this size with exact=True (decode attention splits its work by cache size, benchmarks compare)."""
        if not exact and self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype = self.norm.weight.dtype  # the activations' (a quantized head or embedding stores other dtypes)
        device = self.norm.weight.device
        # One [n_layer, ...] tensor for all layers' caches (the persistent decode kernel takes them whole), each
        # layer's cache a view of it.
        shape = (len(self.layers), max_batch_size, self.layers[0].attention.n_local_heads, max_seq_length,
                 self.config.head_dim)
        self.register_buffer("k_caches", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_caches", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        for i, b in enumerate(self.layers):
            b.attention.kv_cache = KVCache(self.k_caches[i], self.v_caches[i])
        c = self.config
        freqs = precompute_freqs_cis(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling, c.rope_freq_factors)
        self.register_buffer("freqs_cis", freqs.to(device), persistent=False)
        mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """idx: [B, S] token ids at positions input_pos: [S]. Returns logits [B, S, vocab]."""
        if self.max_seq_length < 0:
            raise RuntimeError("call setup_caches(max_batch_size, max_seq_length) before forward")
        mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x, residual = self.tok_embeddings(idx), None
        for layer in self.layers:
            x, residual = layer(x, residual, input_pos, freqs_cis, mask)
        return self.output(self.norm(x, residual)[0])


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, residual, input_pos, freqs_cis, mask):
        """x: the previous block's MLP output (the embeddings for the first block, with residual None), not yet added
        to the residual stream: each norm adds its input to the stream and normalises the sum, so under tensor
        parallelism one kernel all-reduces, adds and normalises (tp.py). Returns (MLP output, residual stream)."""
        x, residual = self.attention_norm(x, residual)
        x, residual = self.ffn_norm(self.attention(x, freqs_cis, mask, input_pos), residual)
        return self.feed_forward(x), residual


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_local_heads = config.n_local_heads  # this rank's key/value heads: the size of its KV cache
        self.head_dim = config.head_dim
        # q, k and v stay separate row blocks of one weight: one launch reads the input once,
        # and each block keeps its own threshold when the layer is made sparse.
        self.qkv_sizes = (config.n_head * config.head_dim, config.n_local_heads * config.head_dim,
                          config.n_local_heads * config.head_dim)
        self.wqkv = nn.Linear(config.dim, sum(self.qkv_sizes), bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        # Qwen3: one norm weight over head_dim, shared by every head (so nothing to shard under tensor parallelism)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache = None

    def forward(self, x, freqs_cis, mask, input_pos):
        # RoPE, the cache write and attention over the cache: one kernel for a decode step, PyTorch for prefill
        qkv = self.wqkv(x)
        if self.q_norm is not None:
            qkv = self.norm_qk(qkv)
        k_cache, v_cache = self.kv_cache.k_cache, self.kv_cache.v_cache
        if x.shape[1] == 1:
            y = decode_step_attention(qkv, freqs_cis, k_cache, v_cache, input_pos)
        else:
            y = cached_attention(qkv, freqs_cis, k_cache, v_cache, input_pos, mask)
        return self.wo(y)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, S, (H + 2 H_kv) D] with each head of q and k RMS-normalised over D (before RoPE, which the
        attention applies). A sparse wqkv of such a model returns its q, k and v summed (sparse.py), not as
        partials."""
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        heads = (*qkv.shape[:-1], -1, self.head_dim)
        q = self.q_norm(q.reshape(heads))[0].flatten(-2)
        k = self.k_norm(k.reshape(heads))[0].flatten(-2)
        return torch.cat([q, k, v], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) fused as in w13: both read the same input.
        self.intermediate_size = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """Adds x to the residual stream (x starts it when there is none) and returns (the sum normalised, the sum).
        x may be the fp32 sum of a sparse layer's partial products (sparse.py): the add then runs in fp32, and either
        way the sum is rounded to the stream's dtype once."""
        h = x if residual is None else (residual + x).to(residual.dtype)
        hf = h.float()
        out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(h) * self.weight, h


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float, rope_scaling: dict | None = None,
                         freq_factors: list[float] | None = None) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.int64).float() / n_elem))
    if rope_scaling is not None:
        freqs = apply_llama31_scaling(freqs, rope_scaling)
    if freq_factors is not None:
        freqs = freqs / torch.tensor(freq_factors, dtype=torch.float32)
    t = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # [seq, n_elem/2, 2]


def apply_llama31_scaling(freqs: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1 RoPE: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mid = (1 - smooth) * freqs / s["factor"] + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / s["factor"], mid))


def checkpoint_folder(checkpoint_path: Path) -> Path:
    """A converted checkpoint's folder, given it or a file in it (model.safetensors); a missing path without a suffix
    is the folder the user meant."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path if checkpoint_path.is_dir() or not checkpoint_path.suffix else checkpoint_path.parent


def load_model(checkpoint_path: Path, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Load a converted checkpoint (model.safetensors + model_config.json in one folder)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    folder = checkpoint_folder(checkpoint_path)
    weights, config = folder / "model.safetensors", folder / "model_config.json"
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(
            f"no converted checkpoint in {folder} (need model.safetensors and model_config.json); convert one with "
            f"`python convert_hf_checkpoint.py --checkpoint_dir HF_FOLDER` or `--gguf FILE.gguf` (no arguments: the default SmolLM2)")
    args = ModelArgs.load(config)
    with torch.device("meta"):
        model = Transformer(args)
    reconvert = "; re-run convert_hf_checkpoint.py"
    try:
        state = load_file(weights, device=str(device) if str(device) != "cpu" else "cpu")
        with safe_open(weights, framework="pt") as f:
            group_size = int((f.metadata() or {}).get("group_size", 0))
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}){reconvert}") from e
    exact = ()  # tensors that keep their dtype
    if group_size:  # weights stored quantized (convert_hf_checkpoint.py --keep_quantization)
        from sparse import QUANTIZED_TENSORS, load_quantized_layers
        load_quantized_layers(model, state, group_size, dtype)
        exact = ("thresholds", *QUANTIZED_TENSORS)
    state = {k: v if k.rsplit(".", 1)[-1] in exact else v.to(dtype) for k, v in state.items()}
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"{weights} does not match {config}: {str(e).splitlines()[-1].strip()}{reconvert}") from e
    if args.tie_embeddings:  # one table (a quantized one's tensors) for the embedding and the head
        for name, table in model.tok_embeddings.named_parameters():
            setattr(model.output, name, table)
    return model.to(device=device).eval()


def random_model(name: str, device="cpu", dtype=torch.bfloat16, seed: int = 0, shard=None) -> Transformer:
    """A named config with random weights at real shapes, for speed measurements without a checkpoint.

    Built on the meta device first, so `shard` (a function that reshapes the module, as tp.py's does)
    runs before any memory is taken: a 70B model is only ever materialised one shard per GPU.
    """
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    if shard is not None:
        shard(model)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:  # norm weights 1, biases 0
                p.fill_(0.0 if name_.endswith(".bias") else 1.0)
    return model.eval()
