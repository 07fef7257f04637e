"""Triton kernels for y = (x * 1[|x| > t]) @ W_t with the threshold test fused in.

Weight layout: W_t is [K, N] (input channels are rows), so every activation that falls under its
threshold skips one contiguous strip of weight bytes; masked loads issue no memory traffic.
Prefill multiplies by the same storage densely (x @ W_t), with no copy.

Grid: (column strips, SPLIT_K). Columns are split into up to three groups (q/k/v, gate/up) with
their own thresholds; a strip never straddles two groups, so each program applies one mask.
Split-K programs write fp32 partials and the last one to finish a strip (an atomic counter, reset
by that same program) sums them and writes the output. There is no bf16 atomic add anywhere, which
is what kept the reference kernel fp16-only, and no second launch.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_TOKENS = 8  # above this many tokens the weight rows an input skips become rare: use a dense matmul
MAX_SPLIT_K = 32


@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, thr_ptr, y_ptr, part_ptr, count_ptr,
                        T, K, N, N0, N1, stride_xt, stride_yt,
                        PER_CHANNEL: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Which threshold group (q, k or v; gate or up) this strip of columns belongs to.
    s0 = tl.cdiv(N0, BLOCK_N)
    s1 = tl.cdiv(N1, BLOCK_N)
    g = (pid_n >= s0).to(tl.int32) + (pid_n >= s0 + s1).to(tl.int32)
    g_start = tl.where(g == 0, 0, tl.where(g == 1, N0, N0 + N1))
    g_end = tl.where(g == 0, N0, tl.where(g == 1, N0 + N1, N))
    strip = pid_n - tl.where(g == 0, 0, tl.where(g == 1, s0, s0 + s1))
    offs_n = g_start + strip * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < g_end
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    if PER_CHANNEL:
        thr_row = thr_ptr + g * K
    else:
        thr = tl.load(thr_ptr + g)

    if BLOCK_T == 1:
        # One token: accumulate elementwise in registers and reduce over K once at the end. The next
        # activation tile is loaded while this tile's weights are in flight, so each iteration waits on
        # one memory latency, not an activation load followed by the weight load it decides.
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < k_stop, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            thr = tl.load(thr_row + offs_k, mask=offs_k < k_stop, other=float("inf"))
        for k0 in range(k_begin, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            keep = tl.abs(x) > thr
            w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None] & n_mask[None, :], other=0.0)
            next_k = offs_k + BLOCK_K
            x_next = tl.load(x_ptr + next_k, mask=next_k < k_stop, other=0.0).to(tl.float32)
            if PER_CHANNEL:
                thr_next = tl.load(thr_row + next_k, mask=next_k < k_stop, other=float("inf"))
            acc2 += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
            x = x_next
            if PER_CHANNEL:
                thr = thr_next
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        # Several tokens: a weight row is skipped only when every token's activation is under threshold.
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_stop
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            if PER_CHANNEL:
                thr = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))[None, :]
            x = tl.where(tl.abs(x.to(tl.float32)) > thr, x.to(tl.float32), 0.0)
            keep = tl.max(tl.abs(x), axis=0) > 0
            w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None] & n_mask[None, :], other=0.0)
            # bf16 and fp16 values are exact in tf32, so a tf32 product loses nothing for them;
            # fp32 inputs take the full-precision path.
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision=DOT_PRECISION)

    out_ptrs = offs_t[:, None] * stride_yt + offs_n[None, :]
    out_mask = t_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_stride = T * N
        tl.store(part_ptr + pid_k * part_stride + offs_t[:, None] * N + offs_n[None, :], acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            total = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + s * part_stride + offs_t[:, None] * N + offs_n[None, :],
                                 mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + out_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch (and the next graph replay)


def _prune(configs, named_args, **kwargs):
    """Keep configs whose grid fills the GPU without splitting K into slivers."""
    n, k = named_args["N"], named_args["K"]
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    kept = []
    for c in configs:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        programs = triton.cdiv(n, bn) * split
        if k // split >= bk and (programs >= sms or split == MAX_SPLIT_K) and (split == 1 or programs <= 32 * sms):
            kept.append(c)
    return kept or configs[:1]


def _configs():
    # Loads here feed no tl.dot, so software pipelining (num_stages) buys nothing; the shape of the
    # tile, the warps and the K split are what decide bandwidth.
    tiles = ((32, 256), (64, 128), (64, 256), (128, 64), (128, 128))
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=w, num_stages=1)
            for bn, bk in tiles for split in (1, 2, 4, 8, 16, 32) for w in (4, 8)]


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_autotuned_kernel = triton.autotune(configs=_configs(), key=["N", "K", "N0", "N1", "BLOCK_T", "PER_CHANNEL"],
                                    prune_configs_by={"early_config_prune": _prune}, do_bench=_bench)(_sparse_gemv_kernel)

_counters: dict[torch.device, torch.Tensor] = {}


def reserve_counters(device: torch.device, strips: int = 1 << 14) -> torch.Tensor:
    """Self-resetting completion counters for split-K, one buffer per device. Call this before any
    torch.compile / CUDA-graph warm-up (SparseLinear does, at construction), so the buffer lives
    outside the graph's memory pool and every captured launch sees one stable address."""
    return _counter_buffer(torch.device(device), strips)


def _counter_buffer(device: torch.device, strips: int) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None or buf.numel() < strips:
        buf = torch.zeros(max(strips, 1 << 14), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def sparse_gemv_triton(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel. x: [T<=8, K]; weight_t: [K, N]; thresholds: fp32 [G] or [G, K]; out: optional [T, N]."""
    t, k = x.shape
    n = weight_t.shape[1]
    n0, n1 = (list(split_sizes) + [0, 0])[:2]
    if len(split_sizes) == 1:
        n0, n1 = n, 0
    elif len(split_sizes) == 2:
        n1 = n - n0
    block_t = 1 if t == 1 else 16
    y = torch.empty((t, n), dtype=x.dtype, device=x.device) if out is None else out
    partials = torch.empty((MAX_SPLIT_K, t, n), dtype=torch.float32, device=x.device)
    counters = _counter_buffer(x.device, triton.cdiv(n, 16) + 3)
    args = (x, weight_t, thresholds, y, partials, counters, t, k, n, n0, n1, x.stride(0), y.stride(0))
    per_channel = thresholds.dim() == 2
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if INTERPRET:
        bn = 32
        strips = sum(triton.cdiv(s, bn) for s in split_sizes)
        split = 2 if k >= 4 * 32 else 1  # exercise the split-K reduction on the CPU too
        _sparse_gemv_kernel[(strips, split)](*args, PER_CHANNEL=per_channel, BLOCK_T=block_t,
                                             DOT_PRECISION=precision, BLOCK_N=bn, BLOCK_K=32, SPLIT_K=split)
    else:
        def grid(meta):
            return (sum(triton.cdiv(s, meta["BLOCK_N"]) for s in split_sizes), meta["SPLIT_K"])
        _autotuned_kernel[grid](*args, PER_CHANNEL=per_channel, BLOCK_T=block_t, DOT_PRECISION=precision)
    return y
