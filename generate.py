"""Generate text, dense or with TEAL activation sparsity, and report decode speed.

    python generate.py --prompt "The capital of France is"                 # default SmolLM2, dense
    python generate.py --sparsity 0.5 --compile                            # sparse decode, CUDA graphs on GPU
    python generate.py --sparsity 0.5 --sparsity_mode greedy --interactive
    python generate.py --sparsity 0.5 --int4                               # 4-bit weights, groups of 128
    python generate.py --sparsity 0.5 --int4 --engine persistent --compile # every layer in one kernel (one GPU)
    python generate.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct-Q4_1   # the default GGUF at its own 4 bits
    torchrun --nproc_per_node=2 generate.py --checkpoint_path ... --sparsity 0.5 --compile   # tensor parallel
"""
import argparse
import functools
import itertools
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch._dynamo.config
import torch._inductor.config

from cli import add_int4_args, fraction, int4_quant, non_empty, non_negative_float, positive_int, user_errors
from model import Transformer, load_model
from sparse import (LAYER_GROUPS, GroupQuant, QuantizedEmbedding, SparsityMeter, cats_layers, catsify, frozen,
                    set_mask_prefill, sparse_layers, sparsify)
from sparse_gemv.cpu import fused_kernel
from thresholds.file import MAX_SPARSITY, MODES, ThresholdFile, apply_thresholds, check_sparsity, default_thresholds
from tokenizer import load_tokenizer

if TYPE_CHECKING:  # the persistent engine's Triton module is imported where it runs
    from sparse_gemv.persistent import DecodeLayers

torch._inductor.config.coordinate_descent_tuning = True
torch._inductor.config.triton.unique_kernel_names = True
torch._inductor.config.fx_graph_cache = True
torch._dynamo.config.cache_size_limit = 64
# Skip the guards of every module whose __dict__ is unchanged since the first call (SparseLinear keeps to what that
# needs: frozen parameters and immutable attributes); without it a small model's compiled step is bound by the host.
torch._dynamo.config.use_recursive_dict_tags_for_guards = True

COMPACT_FROM = 0.7  # sparsity from which the compact kernel beats the predicated one
# int8 gate/up: the predicated loop widens every row of its tiles, kept or not, and is bound by instruction issue
# there, so listing the kept rows first pays from 50%; int8 down gains less and stays predicated.
# 4-bit weights, which dequantize every row of a predicated tile too, follow the same rule.
INT8_GATE_UP_COMPACT_FROM = 0.5
# --interactive sizes the KV caches once for a chat message of up to this many tokens (with the chat template) plus
# --max_new_tokens, as GPT-Fast fixes its chat caches: a message that needs a larger cache recompiles the decode step.
CHAT_PROMPT_TOKENS = 512
SPARSE_KERNELS = {"predicated": (), "compact": tuple(LAYER_GROUPS), "gate-up-compact": ("feed_forward.w13",),
                  "mlp-compact": ("feed_forward.w13", "feed_forward.w2")}
ENGINES = ("per-layer", "persistent", "persistent-stepped")


def compact_layers(kernel: str, sparsity: float, quantized: bool) -> tuple[str, ...]:
    """The layers that take the compact kernel variant for --sparse_kernel `kernel` (a SPARSE_KERNELS name or auto);
    quantized: int8 or 4-bit weights."""
    if kernel == "auto":
        kernel = ("compact" if sparsity >= COMPACT_FROM else
                  "gate-up-compact" if quantized and sparsity >= INT8_GATE_UP_COMPACT_FROM else "predicated")
    return SPARSE_KERNELS[kernel]


def set_pdl(on: bool) -> None:
    """Programmatic dependent launch (Hopper and newer; ignored elsewhere): every kernel of the decode step,
    inductor's and the sparse GEMV, is launched while the previous one drains and waits on-chip for its
    results, so the launch latency between the ~450 kernels of a step leaves the critical path."""
    from sparse_gemv import kernels
    torch._inductor.config.triton.enable_pdl = on
    kernels.PDL = on


def multinomial_sample_one_no_sync(probs):
    # Exponential race instead of torch.multinomial: no host-device sync inside the graph.
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def sample(logits, temperature: float = 1.0, top_k: int | None = None):
    """logits [B, S, V] -> next token [B, 1] from the last position (greedy when temperature == 0).
    With top_k, the softmax and the draw run over the k largest logits only, not the whole vocabulary:
    the same distribution as masking the rest to -inf, at a fraction of the cost (a full-vocabulary
    softmax and draw for one token runs as a single-program kernel over the whole vocabulary)."""
    last = logits[:, -1].float()
    if temperature == 0:
        return last.argmax(dim=-1, keepdim=True).to(torch.int)
    temperature = max(temperature, 1e-5)
    if top_k is None or top_k >= last.size(-1):
        return multinomial_sample_one_no_sync(torch.softmax(last / temperature, dim=-1))
    # A positive temperature does not change which logits are the k largest, and their order does not matter to the
    # draw: no sort.
    values, indices = torch.topk(last, top_k, sorted=False)
    choice = multinomial_sample_one_no_sync(torch.softmax(values / temperature, dim=-1))
    return torch.gather(indices, -1, choice.long()).to(torch.int)


def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, **sampling_kwargs):
    """Returns (next token, whether the last logits are all finite)."""
    logits = model(x, input_pos)
    return sample(logits, **sampling_kwargs), torch.isfinite(logits[:, -1]).all()


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, **sampling_kwargs) -> torch.Tensor:
    return sample(model(x, input_pos), **sampling_kwargs)


def persistent_layers(model: Transformer, programs: int = 0, stepped: bool = False, **tuning) -> "DecodeLayers":
    """The decoder layers as one persistent kernel's input (sparse_gemv/persistent.py): each kind of layer tensor
    stacked into one [n_layer, ...] tensor, and the layers' own tensors made views of it, so there is one copy in
    memory and prefill, the per-layer path and set_thresholds all use the stacked tensors. The model must be sparse
    (sparsify; thresholds 0 for dense decoding), its layers' weights of one format: the activations' dtype, int8, or
    group-wise quantized (--int4, or a checkpoint that keeps GGUF Q4_0 / Q4_1 / Q8_0). programs: the persistent grid
    (0: every program the GPU holds at once); stepped: one launch per phase (the CPU's mode, and a debugging switch on
    a GPU); tuning: DecodeLayers' tile_bytes, num_warps, max_registers, grouped_strip, stages, block_rows. Qwen2's
    q/k/v biases and Qwen3's q/k norm weights are stacked too."""
    blocks = model.layers
    if sum(1 for _ in sparse_layers(model)) != 4 * len(blocks):
        raise ValueError("the persistent engine runs sparse layers: sparsify the model first (thresholds 0 decode "
                         "densely)")
    kinds = {(layer.per_channel, layer.int8, layer.group_quant) for _, _, layer in sparse_layers(model)}
    if len(kinds) != 1:
        raise ValueError("the persistent engine needs every layer's thresholds of one kind and weights of one format")

    def stack(get, put, pad: bool = False):
        first = get(blocks[0])
        # pad: each layer's slice starts on a 16-byte boundary (the kernel takes thresholds at any layer stride).
        # Misaligned views make the per-layer path's compiled step copy them every step and compile slower variants
        # of the kernels that read them (benchmark/RESULTS.md); the other tensors are whole 16-byte multiples.
        align = 16 // first.element_size() if pad else 1  # elements in 16 bytes
        per_layer = -(-first.numel() // align) * align
        stacked = torch.empty((len(blocks), per_layer), dtype=first.dtype, device=first.device)
        stacked = stacked[:, :first.numel()].unflatten(1, first.shape)
        for i, block in enumerate(blocks):  # one layer at a time, so memory holds one extra layer's tensor at most
            stacked[i].copy_(get(block))
            put(block, frozen(stacked[i]))
        return stacked

    def layer_tensors(path, name, pad: bool = False):
        owner, attr = path.split(".")
        return stack(lambda b: getattr(getattr(getattr(b, owner), attr), name),
                     lambda b, t: setattr(getattr(getattr(b, owner), attr), name, t), pad)

    def norm_weights(norms_of):
        first = norms_of(blocks[0])[0].weight
        stacked = torch.empty((len(blocks), 2, *first.shape), dtype=first.dtype, device=first.device)
        for i, block in enumerate(blocks):
            for j, norm in enumerate(norms_of(block)):
                stacked[i, j].copy_(norm.weight)
                norm.weight = frozen(stacked[i, j])
        return stacked

    with torch.no_grad():
        norms = norm_weights(lambda b: (b.attention_norm, b.ffn_norm))
        qk_norms = norm_weights(lambda b: (b.attention.q_norm, b.attention.k_norm)) if model.config.qk_norm else None
        biases = layer_tensors("attention.wqkv", "bias") if model.config.qkv_bias else None
        paths = tuple(LAYER_GROUPS)
        weights = [layer_tensors(p, "weight_t") for p in paths]
        thresholds = [layer_tensors(p, "thresholds", pad=True) for p in paths]
        first = blocks[0].attention.wqkv
        scales = [layer_tensors(p, "scales") for p in paths] if first.scales is not None else []
        zeros = [layer_tensors(p, "zeros") for p in paths] if first.zeros is not None else []
    from sparse_gemv.persistent import DecodeLayers
    return DecodeLayers(norms, weights, thresholds, scales, model.config.norm_eps, programs, stepped, **tuning,
                        qkv_biases=biases, qk_norm_weights=qk_norms, zeros=zeros, group_size=first.group_size)


def persistent_embedding(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token and embedding table the persistent kernel reads the token's row from: the model's own, or for a
    quantized table (QuantizedEmbedding) the token's dequantized row as a one-row table, at index 0."""
    if isinstance(model.tok_embeddings, QuantizedEmbedding):
        return torch.zeros_like(x), model.tok_embeddings(x).view(1, -1)
    return x, model.tok_embeddings.weight


def decode_one_token_persistent(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, layers: "DecodeLayers",
                                **sampling_kwargs) -> torch.Tensor:
    """decode_one_token with every decoder layer in one kernel (persistent_layers); the final norm, the LM head (a
    quantized one through the grouped kernel, its launch in the same graph) and sampling as before."""
    token, table = persistent_embedding(model, x)
    h = layers(token, input_pos, model.freqs_cis, table, model.k_caches, model.v_caches)
    return sample(model.output(model.norm(h)[0]), **sampling_kwargs)


def check_engine(engine: str, rank: int | None, batch_size: int, device: str, mode: str = "uniform") -> None:
    """Refuse what the persistent engine does not run, before anything is loaded."""
    if engine == "per-layer":
        return
    if mode == "cats":
        raise SystemExit(f"--engine {engine} runs TEAL's thresholded projections; CATS's MLP (--sparsity_mode cats) "
                         "runs on --engine per-layer")
    if rank is not None:
        raise SystemExit(f"--engine {engine} runs on one GPU: tensor parallel (torchrun) is not supported; use "
                         "--engine per-layer")
    if batch_size != 1:
        raise SystemExit(f"--engine {engine} decodes batch 1 only, got --batch_size {batch_size}")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(f"--engine {engine} runs a Triton kernel: it needs --device cuda (or TRITON_INTERPRET=1 on the "
                         "CPU, slowly)")


def decode_step(model: Transformer, engine: str):
    """The decode step function for --engine (and the stacked layers it runs, None for per-layer)."""
    if engine == "per-layer":
        return decode_one_token, None
    if not any(True for _ in sparse_layers(model)):
        sparsify(model)  # thresholds 0: the dense model through the same kernel
    layers = persistent_layers(model, stepped=engine == "persistent-stepped")
    return functools.partial(decode_one_token_persistent, layers=layers), layers


def decode_n_tokens(model, cur_token, input_pos, num_new_tokens: int, stop_ids=(), callback=lambda _: None,
                    decode_fn=decode_one_token, **sampling_kwargs):
    new_tokens = []
    for _ in range(num_new_tokens):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            next_token = decode_fn(model, cur_token, input_pos, **sampling_kwargs).clone()
        input_pos += 1
        new_tokens.append(next_token)
        callback(next_token)
        cur_token = next_token
        if stop_ids and next_token.shape[0] == 1 and int(next_token) in stop_ids:
            break
    return new_tokens


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, batch_size: int = 1,
             stop_ids=(), callback=lambda _: None, decode_fn=decode_one_token, prefill_fn=prefill,
             **sampling_kwargs) -> torch.Tensor:
    """prompt: [T] token ids. Returns [batch_size, T + generated] (every row starts with the prompt)."""
    device = prompt.device
    t = prompt.numel()
    max_seq = t + max_new_tokens
    if max_seq > model.config.block_size:
        raise ValueError(f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of {model.config.block_size}; shorten the prompt or lower --max_new_tokens")
    model.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq)
    seq = torch.empty(batch_size, max_seq, dtype=torch.int, device=device)
    seq[:, :t] = prompt.view(1, -1)
    input_pos = torch.arange(0, t, device=device)
    next_token, finite = prefill_fn(model, prompt.view(1, -1).repeat(batch_size, 1), input_pos, **sampling_kwargs)
    if not finite:
        raise FloatingPointError("non-finite logits after prefill: the checkpoint or --dtype is broken "
                                 "(try --dtype float32, or re-convert the checkpoint)")
    seq[:, t] = next_token.view(-1)
    callback(next_token)
    if stop_ids and batch_size == 1 and int(next_token) in stop_ids:
        return seq[:, : t + 1]
    input_pos = torch.tensor([t], device=device, dtype=torch.int)
    new = decode_n_tokens(model, next_token.view(batch_size, -1), input_pos, max_new_tokens - 1, stop_ids,
                          callback, decode_fn, **sampling_kwargs)
    if new:
        seq[:, t + 1: t + 1 + len(new)] = torch.cat(new, dim=-1)
    return seq[:, : t + 1 + len(new)]


def timed_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, callback=lambda _: None,
                   **generate_kwargs) -> tuple[torch.Tensor, dict]:
    """generate(), timed on the host in seconds: total; to_first, until the first token (generate hands it on after
    a host sync on the prefill's finiteness check); queued, until the host had queued every step (before the final
    sync: were it as long as total, the host would be the bottleneck)."""
    first = []

    def on_token(tok):
        if not first:
            first.append(time.perf_counter())
        callback(tok)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    seq = generate(model, prompt, max_new_tokens, callback=on_token, **generate_kwargs)
    queued = time.perf_counter()
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return seq, {"total": time.perf_counter() - t, "to_first": first[0] - t, "queued": queued - t}


def weight_bytes(model: Transformer) -> dict:
    """Bytes a dense decode step reads: every weight but the embedding table (one row of it is read); sparse, those
    of them a sparse step may skip (the sparse layers' weights, with quantized weights' scales and zeros, and CATS's up
    rows)."""
    sparse = {id(t) for _, _, layer in sparse_layers(model) for t in (layer.weight_t, layer.scales, layer.zeros)
              if t is not None}
    total = sum(t.numel() * t.element_size() for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                if not name.startswith("tok_embeddings") and "cache" not in name and "threshold" not in name
                and name not in ("freqs_cis", "causal_mask"))
    if model.config.tie_embeddings:  # the head's table is the embedding's, whose name the tensors are counted under
        total += sum(t.numel() * t.element_size() for name, t in model.output.named_parameters()
                     if "threshold" not in name)
    sparse_bytes = sum(t.numel() * t.element_size() for _, t in model.named_parameters() if id(t) in sparse)
    sparse_bytes += sum(ff.w13.numel() // 2 * ff.w13.element_size() for _, ff in cats_layers(model))
    return {"total": total, "sparse": sparse_bytes}


@torch.no_grad()
def measure_realized_sparsity(model: Transformer, seq: torch.Tensor, prompt_len: int) -> dict:
    """Replay generated sequences [batch, T] (prompt dense, generated tokens masked as decode masks them) and count:
    model, the parameter-weighted share of inputs under threshold; sparse_bytes_moved, the sparse layers' weight bytes
    a decode step reads, which for a batch are the rows some sequence keeps."""
    model.setup_caches(*seq.shape)  # kept as they are when big enough, as after generating seq
    meter = SparsityMeter(model)
    try:
        model(seq[:, :prompt_len], torch.arange(prompt_len, device=seq.device))
        set_mask_prefill(model, True)
        model(seq[:, prompt_len:-1], torch.arange(prompt_len, seq.shape[1] - 1, device=seq.device))
    finally:
        set_mask_prefill(model, False)
        meter.close()
    skipped = meter.skipped_fraction()
    moved = 0.0
    for i, path, layer in sparse_layers(model):
        for proj, n in zip(LAYER_GROUPS[path], layer.split_sizes):
            moved += (1 - skipped.get((i, proj), 0.0)) * layer.in_features * layer.row_bytes(n)
    for i, ff in cats_layers(model):
        moved += (1 - skipped.get((i, "up"), 0.0)) * (ff.w13.numel() // 2) * ff.w13.element_size()
    return {"model": meter.model_sparsity(), "mlp": meter.mlp_sparsity(), "sparse_bytes_moved": moved}


def median_sample(results: list[dict]) -> dict:
    """The sample with the median tokens/s (the upper one of an even count), reported whole: its other figures are
    its own, not the medians of each figure taken separately."""
    return sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]


def cpu_threads(requested: int | None = None) -> int:
    """Threads for CPU decoding: `requested`, else OMP_NUM_THREADS when set, else the cores the 1-minute load average
    leaves free (at least one). A decode step is hundreds of small operations, each a parallel region whose OpenMP
    threads spin while they wait: a thread more than the free cores makes every region wait for a descheduled one."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0  # no load average on Windows
    return max(1, min(cores, cores - busy))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but this PyTorch has no CUDA device; use --device cpu "
                         "(or install a CUDA build of torch)")
    return name


def load_sparse_model(checkpoint_path: Path, device, dtype, sparsity: float, mode: str, thresholds_path: Path | None,
                      kernel: str = "auto", int8: bool = False, group_quant: GroupQuant | None = None):
    """Load a checkpoint and, when sparsity > 0 or a threshold file is named, make its layers sparse.
    kernel: "predicated", "compact" (every layer lists kept rows first), "gate-up-compact" or "mlp-compact" (those
    layers do) or "auto" (compact_layers).
    int8: the sparse layers keep int8 weights with per-output-channel scales, group_quant group-wise quantized ones (at
    sparsity 0 and no threshold file: every input kept, the same kernel). A checkpoint that stores its projections
    quantized (convert_hf_checkpoint.py --keep_quantization) runs them so, with the sparse kernels.
    mode "cats": the MLPs become CATS MLPs (attention dense), sparsity the share of their intermediate activations
    dropped."""
    check_sparsity(sparsity)
    if mode == "cats" and (int8 or group_quant is not None):
        raise SystemExit("--sparsity_mode cats keeps the model's weight dtype; drop --int8 / --int4")
    model = load_model(checkpoint_path, device=device, dtype=dtype)
    stored = next((layer.group_quant for _, _, layer in sparse_layers(model)), None)
    if mode == "cats" and stored is not None:
        raise SystemExit(f"{checkpoint_path} stores its projections quantized; --sparsity_mode cats needs a checkpoint "
                         "in a float dtype (convert it without --keep_quantization)")
    if stored is not None and (int8 or group_quant is not None):
        raise SystemExit(f"{checkpoint_path} stores its projections quantized already ({stored.bits}-bit, groups of "
                         f"{stored.group_size}): run it without --int4 / --int8")
    if sparsity == 0 and thresholds_path is None:
        return (sparsify(model, int8=int8, group_quant=group_quant) if int8 or group_quant else model), None
    path = thresholds_path or default_thresholds(checkpoint_path, model.config.name)
    if not Path(path).exists():
        raise SystemExit(f"no threshold file for model {model.config.name!r} at {path}; calibrate one with "
                         f"`python -m thresholds.calibrate --checkpoint_path {checkpoint_path}` (it writes it into "
                         "the checkpoint's folder, where it is found) or pass --thresholds FILE")
    tf = ThresholdFile.load(path, model.config)
    if mode == "cats":
        if "cats" not in tf.modes():  # before the model is changed: a clear error, not a half-built model
            raise SystemExit(f"{path} has no CATS tables; add them with `python -m thresholds.calibrate --checkpoint_path "
                             f"{checkpoint_path} --from_file {path} --no_allocation --out {path}` (with --data FILE to "
                             "calibrate on a local text offline)")
        catsify(model)
    else:
        quantized = int8 or group_quant is not None or stored is not None
        sparsify(model, per_channel=(mode == "weight-aware"), compact=compact_layers(kernel, sparsity, quantized),
                 int8=int8, group_quant=group_quant)
    apply_thresholds(model, tf, sparsity, mode)
    return model, tf


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt", type=non_empty, default="The capital of France is")
    p.add_argument("--interactive", action="store_true", help="chat: read prompts from stdin, stream the answers")
    p.add_argument("--num_samples", type=positive_int, default=3,
                   help="generations of --prompt (--interactive: until stdin ends)")
    p.add_argument("--max_new_tokens", type=positive_int, default=100)
    p.add_argument("--batch_size", type=positive_int, default=1)
    p.add_argument("--top_k", type=positive_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--compile", action="store_true", help="compile the decode step (mode='reduce-overhead': CUDA graphs)")
    p.add_argument("--compile_prefill", action="store_true",
                   help="compile the prefill too (dynamic shapes, no CUDA graphs): a shorter time to the first token")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads (default: OMP_NUM_THREADS if set, else the cores the load average leaves free)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--sparsity", type=fraction(0, MAX_SPARSITY), default=0.0,
                   help=f"target activation sparsity in [0, {MAX_SPARSITY}]")
    p.add_argument("--sparsity_mode", default="uniform", choices=MODES,
                   help="TEAL's threshold allocations, or cats: CATS's MLP-only sparsity (--sparsity is then the share "
                        "of each MLP's SiLU(gate) activations dropped; attention stays dense)")
    p.add_argument("--thresholds", type=Path, help="threshold file (default: the checkpoint folder's "
                   "thresholds.safetensors if it has one, else the shipped thresholds/<model>.safetensors)")
    p.add_argument("--sparse_kernel", default="auto", choices=["auto", *SPARSE_KERNELS],
                   help=f"GPU kernel variant; auto: compact from sparsity {COMPACT_FROM}, and with --int8 / --int4 "
                        f"gate-up-compact from {INT8_GATE_UP_COMPACT_FROM}")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 (per-output-channel scales) for the seven projections: half the bytes")
    add_int4_args(p)
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch between the decode step's kernels (Hopper+)")
    p.add_argument("--engine", default="per-layer", choices=ENGINES,
                   help="decode step: a kernel per layer and projection (per-layer), every decoder layer in one "
                        "persistent kernel (persistent: experimental, slower than per-layer so far, see the README's "
                        "known limits; batch 1, one GPU; at sparsity 0 the dense model runs through it with zero "
                        "thresholds), or that kernel one launch per phase (persistent-stepped: debugging)")
    p.add_argument("--one_shot_allreduce", action=argparse.BooleanOptionalAction, default=None,
                   help="tensor parallel: decode all-reduces as one-shot all-reduces over symmetric memory instead "
                        "of NCCL's; default: on for sparse decoding, off for dense (each one's faster choice)")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    int4_quant(a)  # the flags' errors before any work

    from tp import maybe_init_dist, set_one_shot, shutdown_dist
    set_one_shot(a.one_shot_allreduce if a.one_shot_allreduce is not None else a.sparsity > 0)
    # In a chat the other ranks wait in a broadcast while rank 0 waits for its user: give that wait a day.
    rank = maybe_init_dist(timeout_s=86400 if a.interactive else 120)
    if rank is not None and a.sparsity_mode == "cats":
        raise SystemExit("--sparsity_mode cats runs on one GPU; tensor parallelism shards TEAL's layers only")
    check_engine(a.engine, rank, a.batch_size, resolve_device(a.device) if rank is None else "cuda", a.sparsity_mode)
    run(a, rank)
    if rank is not None:  # on an error, leave as before: torchrun ends the other ranks
        shutdown_dist()


def read_chat_message(rank: int | None) -> str | None:
    """The user's next message from stdin, None once stdin ends. Under torchrun rank 0 reads it and every rank gets
    it, since all of them run the same generation."""
    message = None
    if rank in (None, 0):
        try:
            message = input("You: ")
        except EOFError:
            print()
    if rank is not None:
        shared = [message]
        torch.distributed.broadcast_object_list(shared, src=0)
        message = shared[0]
    return message


def run(a: argparse.Namespace, rank: int | None) -> None:
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT, DEFAULT_QUANTIZED_CHECKPOINT, main as convert
    device = resolve_device(a.device) if rank is None else f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        set_pdl(a.pdl)
    else:
        torch.set_num_threads(cpu_threads(a.threads))
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}.get(a.dtype) or getattr(torch, a.dtype)
    is_main = rank in (None, 0)
    log = print if is_main else (lambda *args, **kw: None)
    checkpoint = Path(a.checkpoint_path)
    if not (checkpoint / "model.safetensors").exists() and checkpoint == DEFAULT_CHECKPOINT and is_main:
        log(f"{checkpoint} not found: converting the default model (SmolLM2-135M-Instruct GGUF) once")
        convert([])
    if not (checkpoint / "model.safetensors").exists() and checkpoint == DEFAULT_QUANTIZED_CHECKPOINT and is_main:
        log(f"{checkpoint} not found: converting the default model (SmolLM2-135M-Instruct GGUF) at its Q4_1 once")
        convert(["--keep_quantization"])
    if rank is not None:
        torch.distributed.barrier()
    torch.manual_seed(a.seed)

    t0 = time.perf_counter()
    model, _ = load_sparse_model(checkpoint, device, dtype, a.sparsity, a.sparsity_mode, a.thresholds, a.sparse_kernel,
                                 a.int8, int4_quant(a))
    if rank is not None:
        from tp import apply_tp
        apply_tp(model)
    tokenizer = load_tokenizer(checkpoint)
    if a.interactive:
        tokenizer.chat_prompt("")  # a chat template that cannot be used fails now, not at the first message
    log(f"loaded {model.config.name} ({dtype}, {device}"
        + (f", {torch.get_num_threads()} threads" if device == "cpu" else "") + f") in {time.perf_counter() - t0:.2f}s"
        + (f", sparsity {a.sparsity} ({a.sparsity_mode})" if a.sparsity else "") + (", int8 weights" if a.int8 else "")
        + (f", 4-bit weights (groups of {a.group_size}{', zero points' if a.zero_point else ''})" if a.int4 else "")
        + (f", {a.engine} engine" if a.engine != "per-layer" else ""))
    if device == "cpu" and next(sparse_layers(model), None) is not None:  # sparse or quantized layers
        fused_kernel()  # built (once) here, not inside the first sample's time

    if a.compile and device == "cpu":
        log("note: --compile is made for CUDA graphs. On CPU it compiles for a minute or more first, then speeds a dense "
            "model up by fusing its small operations; a sparse model decodes faster without it (each of its layers "
            "stays a custom op, whose call costs more under torch.compile than its fused CPU kernel takes).")
    step, layers = decode_step(model, a.engine)
    decode_fn = torch.compile(step, mode="reduce-overhead", fullgraph=True) if a.compile else step
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if a.compile_prefill else prefill

    sizes = weight_bytes(model)
    stop_ids = tokenizer.stop_ids

    def run_prompt(text: str, callback=lambda _: None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        prompt = torch.tensor(tokenizer.encode(text), dtype=torch.int, device=device)
        return prompt, *timed_generate(model, prompt, a.max_new_tokens, callback, batch_size=a.batch_size,
                                       stop_ids=stop_ids if a.interactive else (), decode_fn=decode_fn,
                                       prefill_fn=prefill_fn, temperature=a.temperature, top_k=a.top_k)

    if a.interactive:  # caches for messages of up to CHAT_PROMPT_TOKENS, made once: a larger cache would recompile
        model.setup_caches(a.batch_size, min(model.config.block_size, a.max_new_tokens + CHAT_PROMPT_TOKENS))
    if a.compile or a.compile_prefill:  # compile (and capture) on --prompt, so that no sample or chat turn pays for it
        log(f"compilation and warm-up: {run_prompt(a.prompt)[2]['total']:.2f} s")
    results = []
    # A chat goes on until stdin ends; otherwise --num_samples generations of --prompt.
    for i in itertools.count() if a.interactive else range(a.num_samples):
        text = a.prompt
        if a.interactive:
            text = read_chat_message(rank)
            if text is None:
                break
            text = tokenizer.chat_prompt(text)
        streamed = []

        def stream(tok):
            streamed.append(int(tok.view(-1)[0]))
            if streamed[-1] not in stop_ids:
                sys.stdout.write(tokenizer.decode(streamed[-1:]))
                sys.stdout.flush()
        prompt, seq, times = run_prompt(text, stream if a.interactive and is_main else (lambda _: None))
        dt = times["total"]
        new = seq.shape[1] - prompt.numel()
        tok_s = new * a.batch_size / dt
        if a.interactive:
            log()
        else:
            log(tokenizer.decode(seq[0].tolist()))
        log(f"sample {i + 1}: {new} tokens in {dt:.2f} s (the first after {1e3 * times['to_first']:.1f} ms), "
            f"{tok_s:.2f} tokens/s, {sizes['total'] * new / dt / 1e9:.2f} GB/s dense-equivalent")
        results.append({"tok_s": tok_s, "steps_s": new / dt, "to_first": times["to_first"]})
    if layers is not None:
        layers.check()
    if not results:
        return

    mid = median_sample(results)
    log("=" * 60)
    log(f"median sample of {len(results)}: {mid['tok_s']:.2f} tokens/s, "
        f"{sizes['total'] * mid['steps_s'] / 1e9:.2f} GB/s dense-equivalent, "
        f"first token after {1e3 * mid['to_first']:.1f} ms (sample {results.index(mid) + 1})")
    if a.sparsity > 0:  # over the last sample
        real = measure_realized_sparsity(model, seq, prompt.numel())
        moved = sizes["total"] - sizes["sparse"] + real["sparse_bytes_moved"]
        log(f"realised activation sparsity {real['model']:.3f} model-wide, {real['mlp']:.3f} of the MLP weights (target "
            f"{a.sparsity}, {a.sparsity_mode}); {moved * mid['steps_s'] / 1e9:.2f} GB/s actually moved")
    if device.startswith("cuda"):
        log(f"peak memory {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
