"""Tensor parallelism for `torchrun --nproc_per_node=N generate.py ...` (and the TP benchmark).

q/k/v and gate/up are split by output channels (each projection's rows split on its own, so every rank
keeps whole heads); o and down are split by input channels, and the norm that reads each one's output all-reduces
it first (AllReduceRMSNorm, swapped in for the model's norms). Sparse layers shard like dense ones:
column-sharded layers threshold the full input with the full thresholds, row-sharded layers threshold their
input slice with the matching slice of per-channel thresholds. q/k/v biases split with their rows; Qwen3's q/k norm
weights (one per head size, shared by all heads) stay whole on every rank. On NCCL groups the decode step's
all-reduces are one-shot all-reduces over symmetric memory fused with the residual add and the norm, unless
set_one_shot(False) sends them through NCCL.
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol

from model import RMSNorm, Transformer
from sparse import SparseLinear, frozen


def maybe_init_dist(backend: str | None = None, timeout_s: float = 120) -> int | None:
    """Join the process group torchrun describes; returns this rank, or None when not launched by torchrun.
    timeout_s: how long a collective waits for the other ranks before it fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else int(os.environ["RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("tensor parallelism with the nccl backend needs CUDA; on CPU it runs over gloo")
    if not dist.is_backend_available(backend):
        raise SystemExit(f"torch.distributed backend {backend!r} is not available in this PyTorch build")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank


def shutdown_dist() -> None:
    """Leave the process group. CUDA graphs that captured NCCL collectives keep their communicators busy, and
    destroying those waits forever (pytorch/pytorch#115388): torch._dynamo.reset frees the compiled graphs first."""
    if dist.is_initialized():
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.destroy_process_group()


def _split(t: torch.Tensor, dim: int, sizes, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of each block of `sizes` along `dim`, concatenated."""
    parts = []
    for block in t.split(list(sizes), dim=dim):
        parts.append(block.chunk(world, dim=dim)[rank])
    return torch.cat(parts, dim=dim).contiguous()


def _shard_linear(layer: nn.Module, style: str, sizes, rank: int, world: int) -> None:
    if isinstance(layer, SparseLinear) and layer.group_size:
        raise ValueError("tensor parallelism does not shard group-wise quantized weights (--int4, a checkpoint kept "
                         "at its GGUF quantization); run them on one GPU, or use --int8")
    if layer.bias is not None:
        if style == "rowwise":  # every rank would add it to its partial output before the all-reduce
            raise ValueError("tensor parallelism does not shard a row-split (o, down) projection with a bias")
        layer.bias = frozen(_split(layer.bias, 0, sizes, rank, world))  # q/k/v biases go with their output rows
    if isinstance(layer, SparseLinear):
        if style == "colwise":
            layer.weight_t = frozen(_split(layer.weight_t, 1, sizes, rank, world))
            if layer.int8:  # one scale per output column: they go with their columns
                layer.scales = frozen(_split(layer.scales, 0, sizes, rank, world))
            layer.split_sizes = tuple(s // world for s in sizes)
            layer.out_features = sum(layer.split_sizes)
        else:
            layer.weight_t = frozen(_split(layer.weight_t, 0, [layer.in_features], rank, world))
            if layer.per_channel:
                layer.thresholds = frozen(_split(layer.thresholds, 1, [layer.in_features], rank, world))
            layer.in_features //= world
    else:
        w = layer.weight
        new = _split(w, 0, sizes, rank, world) if style == "colwise" else _split(w, 1, [w.shape[1]], rank, world)
        layer.weight = frozen(new)
        layer.out_features, layer.in_features = new.shape
    if style == "rowwise":
        # Its output goes to the all-reduce: no partial sums left to a norm (SparseLinear; a dense Linear keeps the
        # mark for the SparseLinear that sparsify may swap in later).
        layer.decode_partials = "reduce"


ONE_SHOT_MAX_BYTES = 128 << 10  # decode-sized inputs (a few tokens x dim); larger ones go through NCCL
# Off: every all-reduce through NCCL. One-shot is faster for sparse decoding but slower for dense (inductor's dense
# kernels that feed the all-reduce run slower ahead of it), so generate.py and bench_decode.py turn it off for dense.
ONE_SHOT = True
ONE_SHOT_PROGRAMS = 8  # most programs per call; program i of every rank exchanges flags with program i of the others
MAX_WORLD = 8
CALL_COUNT_AT = ONE_SHOT_PROGRAMS * MAX_WORLD  # flag words: [program][peer] arrival counts, then [program] call counts
FLAG_BYTES = 4 * (CALL_COUNT_AT + ONE_SHOT_PROGRAMS)
_one_shot_buffers: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def set_one_shot(on: bool) -> None:
    """Choose between one-shot (True) and NCCL (False) decode all-reduces; before the model's first all-reduce."""
    global ONE_SHOT
    ONE_SHOT = on


@torch.library.custom_op("teal::one_shot_all_reduce_rmsnorm", mutates_args=("buffer",))
def one_shot_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                buffer: torch.Tensor, bases: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) for h = residual + the sum of x over the ranks whose symmetric buffers start at `bases`
    (int64, one address per rank); `buffer` is this rank's (two slots of ONE_SHOT_MAX_BYTES, then the flags), named
    so the compiler orders calls that share it. x, residual: [..., dim]; weight: [dim]."""
    slot_numel = (buffer.numel() - FLAG_BYTES // buffer.element_size()) // 2
    dim = x.shape[-1]
    if x.numel() > slot_numel or x.dtype != buffer.dtype:
        raise ValueError(f"one_shot_all_reduce_rmsnorm: {x.numel()} {x.dtype} values do not fit a slot of {slot_numel} "
                         f"{buffer.dtype}; larger inputs go through funcol.all_reduce")
    if residual.shape != x.shape or residual.dtype != x.dtype or tuple(weight.shape) != (dim,):
        raise ValueError(f"one_shot_all_reduce_rmsnorm: residual must be like x ({tuple(x.shape)} {x.dtype}) and weight "
                         f"[{dim}], got {tuple(residual.shape)} {residual.dtype} and {tuple(weight.shape)}")
    if not x.is_cuda:
        raise NotImplementedError("teal::one_shot_all_reduce_rmsnorm reads peers' GPU memory over NVLink; CPU groups "
                                  "use gloo")
    return launch_one_shot_all_reduce_rmsnorm(x.contiguous(), residual.contiguous(), weight, eps, bases, slot_numel,
                                              rank)


def launch_one_shot_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                       bases: torch.Tensor, slot_numel: int,
                                       rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch behind teal::one_shot_all_reduce_rmsnorm, for contiguous inputs the op has checked."""
    from sparse_gemv.one_shot_all_reduce import _one_shot_all_reduce_rmsnorm_kernel  # triton: imported where it runs
    normed, h = torch.empty_like(x), torch.empty_like(x)
    dim = x.shape[-1]
    rows = x.numel() // dim
    block = 1 << (dim - 1).bit_length()  # the next power of two
    _one_shot_all_reduce_rmsnorm_kernel[(min(ONE_SHOT_PROGRAMS, rows),)](
        x, residual, weight, normed, h, bases, rows, dim, slot_numel, eps, RANK=rank, WORLD=bases.numel(), BLOCK=block,
        MAX_W=MAX_WORLD, CALL_COUNT_AT=CALL_COUNT_AT, num_warps=min(16, max(4, block // 1024)))
    return normed, h


@one_shot_all_reduce_rmsnorm.register_fake
def _(x, residual, weight, eps, buffer, bases, rank):
    return torch.empty_like(x), torch.empty_like(x)


def _one_shot_buffer(x: torch.Tensor, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's symmetric buffer for x's device and dtype, zeroed, and every rank's buffer address (collective)."""
    key = (x.device, x.dtype)
    if key not in _one_shot_buffers:
        from torch.distributed import _symmetric_memory as symm_mem
        if dist.get_world_size() > MAX_WORLD:
            raise ValueError(f"the one-shot all-reduce supports up to {MAX_WORLD} ranks: pass --no-one_shot_allreduce "
                             "(tp.set_one_shot(False)) to use NCCL")
        buf = symm_mem.empty((2 * ONE_SHOT_MAX_BYTES + FLAG_BYTES) // x.element_size(), dtype=x.dtype, device=x.device)
        buf.zero_()
        handle = symm_mem.rendezvous(buf, group)
        bases = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=x.device)
        torch.cuda.synchronize(x.device)
        dist.barrier()  # every rank's flags are zero before any rank signals
        _one_shot_buffers[key] = buf, bases
    return _one_shot_buffers[key]


class AllReduceRMSNorm(RMSNorm):
    """The norm after a row-sharded projection (o, down): it all-reduces the projection's partial output before adding
    it to the residual stream and normalising. On an NCCL group with ONE_SHOT on, inputs up to ONE_SHOT_MAX_BYTES take
    one kernel for all of it (teal::one_shot_all_reduce_rmsnorm: every rank's input is read directly over NVLink from
    a symmetric-memory buffer, no multicast) in place of NCCL's kernel and the norm's. The buffer is made on first use
    outside torch.compile (the eager prefill; a collective call, which every rank reaches in the same order) and
    registered here, so CUDA graphs see module buffers at fixed addresses (any other tensor input they copy into their
    own memory, which is not symmetric)."""

    def forward(self, x, residual=None):
        if ONE_SHOT and not hasattr(self, "one_shot_buffer") and not torch.compiler.is_compiling() and x.is_cuda \
                and dist.get_backend() == "nccl":
            buf, bases = _one_shot_buffer(x, dist.group.WORLD.group_name)
            self.register_buffer("one_shot_buffer", buf, persistent=False)
            self.register_buffer("one_shot_bases", bases, persistent=False)
        buf = getattr(self, "one_shot_buffer", None) if ONE_SHOT else None
        if (buf is not None and residual is not None and buf.dtype == x.dtype == residual.dtype
                and x.numel() * x.element_size() <= ONE_SHOT_MAX_BYTES):
            return one_shot_all_reduce_rmsnorm(x, residual, self.weight, self.eps, buf, self.one_shot_bases,
                                               dist.get_rank())
        # Through NCCL rank 0 adds the residual ahead of the all-reduce, where inductor fuses the add into the kernel
        # that makes x; after the all-reduce it slowed the dense model's SwiGLU-and-down kernel.
        if residual is not None and dist.get_rank() == 0:
            x = residual + x
        return super().forward(funcol.all_reduce(x, "sum", dist.group.WORLD))


def _parallel_norm(norm: RMSNorm) -> AllReduceRMSNorm:
    new = AllReduceRMSNorm(norm.weight.shape[0], norm.eps)
    new.weight = norm.weight
    return new


def apply_tp(model: Transformer, rank: int | None = None, world: int | None = None) -> Transformer:
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    c = model.config
    for what, n in (("heads", c.n_head), ("key/value heads", c.n_local_heads), ("ffn size", c.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallel size {world} does not divide the model's {what} ({n})")
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        _shard_linear(attn.wqkv, "colwise", attn.qkv_sizes, rank, world)
        _shard_linear(attn.wo, "rowwise", None, rank, world)
        _shard_linear(ffn.w13, "colwise", (ffn.intermediate_size,) * 2, rank, world)
        _shard_linear(ffn.w2, "rowwise", None, rank, world)
        attn.n_local_heads //= world
        attn.qkv_sizes = tuple(s // world for s in attn.qkv_sizes)
        ffn.intermediate_size //= world
    # every norm but the first block's reads a row-sharded projection's output (the previous block's down)
    for i, block in enumerate(model.layers):
        if i > 0:
            block.attention_norm = _parallel_norm(block.attention_norm)
        block.ffn_norm = _parallel_norm(block.ffn_norm)
    model.norm = _parallel_norm(model.norm)
    return model
