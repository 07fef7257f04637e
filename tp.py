"""Tensor parallelism for `torchrun --nproc_per_node=N generate.py ...` (and the TP benchmark).

q/k/v and gate/up are split by output channels (each projection's rows split on its own, so every rank
keeps whole heads); o and down are split by input channels, followed by one all-reduce each (the block's
residual, which those projections add, is added on rank 0 only). Sparse layers shard like dense ones:
column-sharded layers threshold the full input with the full thresholds, row-sharded layers threshold their
input slice with the matching slice of per-channel thresholds.
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol

from model import Transformer
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
    else:
        w = layer.weight
        new = _split(w, 0, sizes, rank, world) if style == "colwise" else _split(w, 1, [w.shape[1]], rank, world)
        layer.weight = nn.Parameter(new, requires_grad=False)
        layer.out_features, layer.in_features = new.shape


def _all_reduce_output(module, inputs, output):
    return funcol.all_reduce(output, "sum", list(range(dist.get_world_size())))


def _drop_residual(module, args, kwargs):
    # The block passes its residual into the output projection; the all-reduce sums every rank's output,
    # so only rank 0 adds it.
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
        _shard_linear(attn.wqkv, "colwise", attn.qkv_sizes, rank, world)
        _shard_linear(attn.wo, "rowwise", None, rank, world)
        _shard_linear(ffn.w13, "colwise", (ffn.intermediate_size,) * 2, rank, world)
        _shard_linear(ffn.w2, "rowwise", None, rank, world)
        attn.n_local_heads //= world
        attn.qkv_sizes = tuple(s // world for s in attn.qkv_sizes)
        ffn.intermediate_size //= world
        attn.register_forward_hook(_all_reduce_output)
        ffn.register_forward_hook(_all_reduce_output)
        if rank != 0:
            attn.register_forward_pre_hook(_drop_residual, with_kwargs=True)
            ffn.register_forward_pre_hook(_drop_residual, with_kwargs=True)
    return model
