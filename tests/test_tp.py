"""Tensor parallelism over gloo on the CPU: 2 and 4 ranks reproduce the single-process logits."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse import set_thresholds, sparsify
from tests.test_sparse import tiny_model
from tp import (FLAG_BYTES, ONE_SHOT_MAX_BYTES, AllReduceRMSNorm, apply_tp, one_shot_all_reduce_rmsnorm, set_one_shot,
                shutdown_dist)


def make_sparse(m, per_channel: bool, int8: bool = False):
    """Per-channel thresholds (made sparse before sharding: each rank slices its own) or per-tensor ones; int8
    weights (quantized before sharding: each rank slices the scales of its own output columns)."""
    if int8:
        sparsify(m, int8=True)
        set_thresholds(m, torch.rand(2, 7, generator=torch.Generator().manual_seed(8)) * 0.3)
    elif per_channel:
        sparsify(m, per_channel=True)
        set_thresholds(m, {(i, p): torch.rand(96 if p == "down" else 64, generator=torch.Generator().manual_seed(i))
                           * 0.3 for i in range(2) for p in ("q", "k", "v", "o", "gate", "up", "down")})
    else:
        sparsify(m)
        set_thresholds(m, torch.rand(2, 7, generator=torch.Generator().manual_seed(7)) * 0.3)


SPARSE = [None, "before", "after", "int8"]


def worker(rank, world, port, result_dir):
    # Every sparse variant in one set of processes (each rank's start, importing torch, costs more than its work), each
    # in a process group of its own, torn down before the next one starts.
    for n, sparse in enumerate(SPARSE):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port + n))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        m = tiny_model(5, n_head=8, n_local_heads=4)
        if sparse in ("before", "int8"):
            make_sparse(m, per_channel=sparse == "before", int8=sparse == "int8")
        apply_tp(m)
        if sparse == "after":  # as the benchmark builds big random models: sharded first, then made sparse
            make_sparse(m, per_channel=False)
        m.setup_caches(1, 32)
        with torch.no_grad():
            logits = [m(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate([3, 9, 27, 81 % 96])]
        if rank == 0:
            torch.save(torch.cat(logits, 1), f"{result_dir}/{sparse}.pt")
        shutdown_dist()  # as generate.py and the benchmark leave
        assert not dist.is_initialized()


def failing_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))  # would hang forever without failure propagation


@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_match_single_process(tmp_path, world):
    mp.spawn(worker, args=(world, 29500 + 10 * world, str(tmp_path)), nprocs=world, join=True)
    for sparse in SPARSE:
        ref = tiny_model(5, n_head=8, n_local_heads=4)
        if sparse:
            make_sparse(ref, per_channel=sparse == "before", int8=sparse == "int8")
        ref.setup_caches(1, 32)
        with torch.no_grad():
            expected = torch.cat([ref(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate([3, 9, 27, 81])], 1)
        got = torch.load(tmp_path / f"{sparse}.pt", weights_only=True)
        assert (got - expected).abs().max() < 1e-4, sparse  # fp32; all-reduce changes only the summation order


def test_failing_rank_raises_instead_of_hanging():
    with pytest.raises(Exception, match="failed on purpose"):
        mp.spawn(failing_worker, args=(2, 29555), nprocs=2, join=True)


def test_tp_size_must_divide_heads():
    with pytest.raises(ValueError, match="does not divide"):
        apply_tp(tiny_model(), rank=0, world=3)


def test_nccl_switch_bypasses_a_registered_one_shot_buffer(tmp_path):
    # With the switch off, the norm takes funcol and model.RMSNorm even when it already holds a one-shot buffer; here a
    # plain CPU tensor stands in for that buffer, so the one-shot path (switch on) fails in the fused op instead.
    from model import RMSNorm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        norm = AllReduceRMSNorm(8)
        buffer = torch.zeros((2 * ONE_SHOT_MAX_BYTES + FLAG_BYTES) // 4)
        norm.register_buffer("one_shot_buffer", buffer, persistent=False)
        norm.register_buffer("one_shot_bases", torch.zeros(1, dtype=torch.int64), persistent=False)
        x, residual = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
        set_one_shot(False)
        for got, want in zip(norm(x, residual), RMSNorm(8)(x, residual)):  # one rank: the sum is x itself
            assert torch.equal(got, want)
        set_one_shot(True)
        with pytest.raises(NotImplementedError, match="teal::one_shot_all_reduce_rmsnorm"):  # GPU memory only
            norm(x, residual)
    finally:
        set_one_shot(True)
        dist.destroy_process_group()


def test_one_shot_all_reduce_rejects_inputs_its_buffer_cannot_hold():
    buffer = torch.zeros((2 * ONE_SHOT_MAX_BYTES + FLAG_BYTES) // 2, dtype=torch.bfloat16)
    bases = torch.zeros(2, dtype=torch.int64)
    weight = torch.ones(8, dtype=torch.bfloat16)

    def call(x, residual=None, w=weight):
        return one_shot_all_reduce_rmsnorm(x, x if residual is None else residual, w, 1e-5, buffer, bases, 0)
    with pytest.raises(ValueError, match="do not fit a slot"):
        call(torch.zeros(ONE_SHOT_MAX_BYTES // 16 + 1, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit a slot"):
        call(torch.zeros(1, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="residual must be like x"):
        call(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight"):
        call(torch.zeros(1, 8, dtype=torch.bfloat16), w=torch.ones(16, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="GPU memory"):
        call(torch.zeros(1, 8, dtype=torch.bfloat16))


def test_fused_kernel_on_one_rank_adds_the_residual_normalises_and_alternates_slots():
    # The kernel itself under TRITON_INTERPRET, one rank (no peers to signal): h = x + residual, normed = RMSNorm(h) *
    # weight against float64 math on the returned h, and each program's call count picks the slot its rows go to.
    # The interpreter truncates fp32 to bf16 where the GPU rounds to nearest, so a rounding may miss by one bf16 ulp
    # (2^-7 relative) instead of half of one; the normalised value is rounded twice.
    import triton

    from sparse_gemv.one_shot_all_reduce import _one_shot_all_reduce_rmsnorm_kernel
    from tp import CALL_COUNT_AT, MAX_WORLD
    buffer = torch.zeros((2 * ONE_SHOT_MAX_BYTES + FLAG_BYTES) // 2, dtype=torch.bfloat16)
    bases = torch.tensor([buffer.data_ptr()], dtype=torch.int64)
    slot = (buffer.numel() - FLAG_BYTES // 2) // 2
    calls = buffer[2 * slot:].view(torch.int32)[CALL_COUNT_AT:CALL_COUNT_AT + 8]
    g = torch.Generator().manual_seed(0)
    for call, (rows, dim) in enumerate([(1, 1000), (3, 64), (9, 40), (1, 1000)]):
        x, residual = (torch.randn(rows, dim, generator=g).bfloat16() for _ in range(2))
        weight = (torch.rand(dim, generator=g) + 0.5).bfloat16()
        normed, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        before = calls.clone()
        _one_shot_all_reduce_rmsnorm_kernel[(min(8, rows),)](
            x, residual, weight, normed, h, bases, rows, dim, slot, 1e-5, RANK=0, WORLD=1,
            BLOCK=triton.next_power_of_2(dim), MAX_W=MAX_WORLD, CALL_COUNT_AT=CALL_COUNT_AT)
        torch.testing.assert_close(h.double(), x.double() + residual.double(), rtol=2 ** -7, atol=1e-30)
        hd = h.double()
        want = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
        torch.testing.assert_close(normed.double(), want, rtol=2 * 2 ** -7, atol=1e-30)
        for row in range(rows):  # row r went to program r % 8, into the slot its call count chose
            start = int(before[row % 8] % 2) * slot + row * dim
            assert torch.equal(buffer[start:start + dim], x[row]), f"call {call} row {row}"
        assert torch.equal(calls - before, torch.tensor([1] * min(8, rows) + [0] * (8 - min(8, rows)), dtype=torch.int32))
