"""Tensor parallelism for `torchrun --nproc_per_node=N generate.py ...` (and the TP benchmark).

q/k/v and gate/up are split by output channels (each projection's rows split on its own, so every rank
keeps whole heads); o and down are split by input channels, followed by one all-reduce each. The block's
residual, which those projections add, is counted once: a dense projection adds it after its all-reduce
(RowParallelLinear); a sparse one adds it in its kernel's epilogue on rank 0 only, before the all-reduce that
runs on the attention / MLP output. Sparse layers shard like dense ones: column-sharded layers threshold the
full input with the full thresholds, row-sharded layers threshold their input slice with the matching slice
of per-channel thresholds. A model may be made sparse before or after it is sharded.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from model import Attention, Linear, Transformer
from sparse import SparseLinear


def maybe_init_dist(backend: str | None = None) -> int | None:
    """Join the process group torchrun describes; returns this rank, or None when not launched by torchrun."""
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
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    return rank


def _split(t: torch.Tensor, dim: int, sizes, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of each block of `sizes` along `dim`, concatenated."""
    parts = []
    for block in t.split(list(sizes), dim=dim):
        parts.append(block.chunk(world, dim=dim)[rank])
    return torch.cat(parts, dim=dim).contiguous()


class RowParallelLinear(Linear):
    """A dense row-sharded output projection (o, down): the partial products are all-reduced, then the block's
    residual is added. (Added on rank 0 before the all-reduce, inductor fused the add into its GEMV, which then
    took 25 instead of 16.5 us for the llama-3-70b TP2 o projection: tp-llama-3-70b-NVIDIA-H200-tp2.json.)"""

    def forward(self, x, residual=None):
        y = funcol.all_reduce(F.linear(x, self.weight, self.bias), "sum", list(range(dist.get_world_size())))
        return y if residual is None else residual + y


def _shard_linear(layer: nn.Module, style: str, sizes, rank: int, world: int) -> nn.Module:
    """Shard `layer` for this rank; returns the module to put in its place."""
    if isinstance(layer, SparseLinear):
        if style == "colwise":
            layer.weight_t = _split(layer.weight_t, 1, sizes, rank, world)
            layer.split_sizes = [s // world for s in sizes]
            layer.out_features = sum(layer.split_sizes)
        else:
            layer.weight_t = _split(layer.weight_t, 0, [layer.in_features], rank, world)
            if layer.per_channel:
                layer.thresholds = _split(layer.thresholds, 1, [layer.in_features], rank, world)
            layer.in_features //= world
    elif style == "colwise":
        w = _split(layer.weight, 0, sizes, rank, world)
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer.out_features = w.shape[0]
    else:
        w = _split(layer.weight, 1, [layer.in_features], rank, world)
        layer = RowParallelLinear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _sparse_projection(module: nn.Module) -> bool:
    """Whether the attention's / MLP's output projection is sparse (it may have been made so after sharding)."""
    return isinstance(module.wo if isinstance(module, Attention) else module.w2, SparseLinear)


def _all_reduce_output(module, inputs, output):
    # A dense projection has reduced its own output (RowParallelLinear).
    if not _sparse_projection(module):
        return output
    return funcol.all_reduce(output, "sum", list(range(dist.get_world_size())))


def _drop_residual(module, args, kwargs):
    # A sparse projection adds the block's residual in its kernel, before the all-reduce sums every rank's
    # output: only rank 0 adds it.
    if _sparse_projection(module):
        return args, {**kwargs, "residual": None}


def apply_tp(model: Transformer, rank: int | None = None, world: int | None = None) -> Transformer:
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    c = model.config
    for what, n in (("heads", c.n_head), ("key/value heads", c.n_local_heads), ("ffn size", c.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallel size {world} does not divide the model's {what} ({n})")
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        attn.wqkv = _shard_linear(attn.wqkv, "colwise", attn.qkv_sizes, rank, world)
        attn.wo = _shard_linear(attn.wo, "rowwise", None, rank, world)
        ffn.w13 = _shard_linear(ffn.w13, "colwise", (ffn.intermediate_size,) * 2, rank, world)
        ffn.w2 = _shard_linear(ffn.w2, "rowwise", None, rank, world)
        attn.n_head //= world
        attn.n_local_heads //= world
        attn.qkv_sizes = tuple(s // world for s in attn.qkv_sizes)
        ffn.intermediate_size //= world
        attn.register_forward_hook(_all_reduce_output)
        ffn.register_forward_hook(_all_reduce_output)
        if rank != 0:
            attn.register_forward_pre_hook(_drop_residual, with_kwargs=True)
            ffn.register_forward_pre_hook(_drop_residual, with_kwargs=True)
    return model
