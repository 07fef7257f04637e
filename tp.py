"""Tensor parallelism for `torchrun --nproc_per_node=N generate.py ...` (and the TP benchmark).

q/k/v and gate/up are split by output channels (each projection's rows split on its own, so every rank
keeps whole heads); o and down are split by input channels, followed by one all-reduce each (the block's
residual, which those projections add, is added on rank 0 only). Sparse layers shard like dense ones:
column-sharded layers threshold the full input with the full thresholds, row-sharded layers threshold their
input slice with the matching slice of per-channel thresholds. On NCCL groups the decode step's all-reduces are
one-shot all-reduces over symmetric memory (all_reduce below) unless set_one_shot(False) sends them through NCCL.
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
            if layer.int8:  # one scale per output column: they go with their columns
                layer.scales = _split(layer.scales, 0, sizes, rank, world)
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
    if style == "rowwise":
        # Its output goes to the all-reduce: no partial sums left to a norm (SparseLinear; a dense Linear keeps the
        # mark for the SparseLinear that sparsify may swap in later).
        layer.sum_partials_downstream = False


ONE_SHOT_MAX_BYTES = 128 << 10  # decode-sized inputs (a few tokens x dim); larger ones go through NCCL
# Off: every all-reduce through NCCL. On TP2 H200 runs one-shot made 50% sparse decode 75.2 against 67.1 tok/s but
# dense 44.1 against 47.8 (tp-llama-3-70b-{diag-oneshot,nccl}-*.json: inductor's dense kernels that feed the
# all-reduce run slower ahead of the one-shot op), so generate.py and bench_decode.py turn it off for dense decoding.
ONE_SHOT = True
_one_shot_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def set_one_shot(on: bool) -> None:
    """Choose between one-shot (True) and NCCL (False) decode all-reduces; before the model's first all-reduce."""
    global ONE_SHOT
    ONE_SHOT = on


def all_reduce(x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """Sum of x over the ranks. On an NCCL group with ONE_SHOT on, inputs up to ONE_SHOT_MAX_BYTES take a one-shot
    all-reduce: one kernel that copies x into a symmetric-memory buffer and sums every rank's buffer read directly
    over NVLink (no multicast), in place of NCCL's kernel. The buffer is made on first use outside torch.compile (the
    eager prefill; a collective call, which every rank reaches in the same order) and registered on `owner`, so CUDA
    graphs see a module buffer at a fixed address (any other tensor input they copy into their own memory, which is
    not symmetric)."""
    group = dist.group.WORLD.group_name
    if ONE_SHOT and not hasattr(owner, "one_shot_buffer") and not torch.compiler.is_compiling() and x.is_cuda \
            and dist.get_backend() == "nccl":
        key = (x.device, x.dtype)
        if key not in _one_shot_buffers:
            from torch.distributed import _symmetric_memory as symm_mem
            symm_mem.enable_symm_mem_for_group(group)
            buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // x.element_size(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group)
            _one_shot_buffers[key] = buf
        owner.register_buffer("one_shot_buffer", _one_shot_buffers[key], persistent=False)
    buf = getattr(owner, "one_shot_buffer", None) if ONE_SHOT else None
    if buf is not None and buf.dtype == x.dtype and x.numel() <= buf.numel():
        x = x.contiguous()
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:x.numel()].view_as(x), x, "sum", group)
    return funcol.all_reduce(x, "sum", list(range(dist.get_world_size())))


def _all_reduce_output(module, inputs, output):
    return all_reduce(output, module)


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
