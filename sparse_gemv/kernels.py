"""Triton kernels for y = (x * 1[|x| > t]) @ W_t with the threshold test fused in.

Weight layout: W_t is [K, N] (input channels are rows), so every activation that falls under its
threshold skips one contiguous strip of weight bytes; masked loads issue no memory traffic.
Prefill multiplies by the same storage densely (x @ W_t), with no copy.

Grid: (column strips, SPLIT_K). Columns are split into up to three groups (q/k/v, gate/up) with
their own thresholds; a strip never straddles two groups, so each program applies one mask.
Split-K programs write fp32 partials and the last one to finish a strip (an atomic counter, reset
by that same program) sums them and writes the output. There is no bf16 atomic add anywhere, which
is what kept the reference kernel fp16-only, and no second launch. With REDUCE off the partials are the
output (teal::sparse_gemv_partials) and whoever reads them adds them up, so the kernel ends after one store.

On Hopper and newer the kernel takes part in programmatic dependent launch (PDL): it is launched while the
previous kernel drains, waits on-chip (gdc_wait) before its first read, and lets the next kernel launch once its
weights are all read (gdc_launch_dependents), so launch latency leaves the decode step's critical path.

With SCALED the weights are int8 with one fp32 scale per output column (weight-only quantization, half the bytes
of bf16): rows are skipped the same way, and the scale multiplies the fp32 sum once.

Two ways to skip rows, one kernel (COMPACT):
- predicated: walk every row, masking the weight loads of rows under threshold. Loads are software-
  pipelined (three stages) so several tiles are in flight per program; best up to about 65% sparsity.
- compact: first list the kept rows of the program's K range, then load only those. Every tile is
  full of useful bytes and the loop is (1 - s) as long, which wins at 80% and above on large matrices.

Above about 50% sparsity the one-token loop is bound by instruction issue, not bytes, so two flags trim it where
the shape allows: PACK=2 reads bf16 weights as int32 pairs and widens each half to fp32 with one integer op (a
shift or a mask) instead of a conversion; EVEN_N drops the column mask when every group is a whole number of strips.
PACK=4 does the same for int8 weights: int32 words of four, each byte widened by a logic op and a subtraction, where
the int8-to-float conversion issues at a quarter of the FMA rate.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from sparse_gemv.ops import MAX_TOKENS, check_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PDL = True  # programmatic dependent launch where the GPU has it (Hopper+); a flag so benchmarks can turn it off
MAX_SPLIT_K = 32
# Most rows examined at a time when listing kept rows. Each chunk is a dependent load, scan and store ahead of the
# weight loads, so a launch examines its whole K range at once up to this many rows, and no more than the range.
MAX_LIST_CHUNK = 4096


@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, thr_ptr, y_ptr, part_ptr, count_ptr, rows_ptr, scale_ptr,
                        T, K, N, N0, N1, stride_xt, stride_yt,
                        PER_CHANNEL: tl.constexpr, SCALED: tl.constexpr, BLOCK_T: tl.constexpr,
                        DOT_FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                        COMPACT: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                        PACK: tl.constexpr, EVEN_N: tl.constexpr, REDUCE: tl.constexpr, LIST_CHUNK: tl.constexpr):
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
    if EVEN_N:
        n_mask = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        n_mask = offs_n < g_end
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    if PER_CHANNEL:
        thr_row = thr_ptr + g * K
    else:
        thr = tl.load(thr_ptr + g)  # thresholds are no kernel's output: read while the previous kernel drains
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output: nothing is read before it is complete
    if PACK > 1:
        # PACK columns per int32 word: word j of a row holds columns PACK * j .. PACK * j + PACK - 1.
        w_words = w_ptr.to(tl.pointer_type(tl.int32))
        offs_w = (g_start + strip * BLOCK_N) // PACK + tl.arange(0, BLOCK_N // PACK)
        if EVEN_N:
            w_mask = tl.full((BLOCK_N // PACK,), 1, tl.int1)
        else:
            w_mask = offs_w < g_end // PACK
        # acc_b sums column b of each word (bf16 pairs: the low half is b = 0; int8 quads: byte b). With PACK == 2
        # acc_2 and acc_3 stay zero and unused, and the compiler drops them.
        acc_0 = tl.zeros((BLOCK_K, BLOCK_N // PACK), dtype=tl.float32)
        acc_1 = tl.zeros((BLOCK_K, BLOCK_N // PACK), dtype=tl.float32)
        acc_2 = tl.zeros((BLOCK_K, BLOCK_N // PACK), dtype=tl.float32)
        acc_3 = tl.zeros((BLOCK_K, BLOCK_N // PACK), dtype=tl.float32)
    elif BLOCK_T == 1:
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)

    if COMPACT:
        # Pass 1: list this split's kept rows (where any token is over threshold) in order. Every strip of
        # the same group and split writes the same list to the same place, so the overlapping writes agree.
        # Pass 2 then loads only kept rows: each weight tile is full of useful bytes, and the loop runs
        # (1 - sparsity) times as long, so high sparsity is not paid for in per-iteration memory latency.
        slots = rows_ptr + g * K + k_begin
        count = k_begin * 0  # an int32 scalar tensor, so the loop carries one type
        for c0 in range(k_begin, k_stop, LIST_CHUNK):
            offs_c = c0 + tl.arange(0, LIST_CHUNK)
            in_range = offs_c < k_stop
            if PER_CHANNEL:
                thr_c = tl.load(thr_row + offs_c, mask=in_range, other=float("inf"))
            else:
                thr_c = thr
            keep = tl.zeros((LIST_CHUNK,), dtype=tl.int32)
            for t in range(T):
                xt = tl.load(x_ptr + t * stride_xt + offs_c, mask=in_range, other=0.0).to(tl.float32)
                keep = keep | (tl.abs(xt) > thr_c).to(tl.int32)
            pos = count + tl.cumsum(keep, 0) - 1
            tl.store(slots + pos, offs_c, mask=keep != 0)
            count += tl.sum(keep, 0)
        tl.debug_barrier()  # the list is visible to every thread of this program before it is read
        for j in tl.range(0, count, BLOCK_K, num_stages=STAGES):
            offs_j = j + tl.arange(0, BLOCK_K)
            valid = offs_j < count
            rows = tl.load(slots + offs_j, mask=valid, other=0)
            if PACK > 1:
                w = tl.load(w_words + rows[:, None] * (N // PACK) + offs_w[None, :], mask=valid[:, None] & w_mask[None, :], other=0)
                xv = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
                acc_0, acc_1, acc_2, acc_3 = add_word_products(acc_0, acc_1, acc_2, acc_3, w, xv, PACK)
            elif BLOCK_T == 1:
                w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0)
                xv = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)
                acc2 += xv[:, None] * w.to(tl.float32)
            else:
                w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0)
                xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + rows[None, :],
                             mask=t_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)
                if PER_CHANNEL:
                    thr = tl.load(thr_row + rows, mask=valid, other=float("inf"))[None, :]
                xv = tl.where(tl.abs(xv) > thr, xv, 0.0)
                if DOT_FP32:
                    acc = tl.dot(xv, w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), acc)
    else:
        # Predicated: walk every row and let the mask drop the loads of rows under threshold (a masked
        # load issues no memory traffic). Best at low sparsity, where compaction would buy nothing.
        for k0 in tl.range(k_begin, k_stop, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_stop
            if PER_CHANNEL:
                thr = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
            if BLOCK_T == 1:
                x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                keep = tl.abs(x) > thr
                if PACK > 1:
                    w = tl.load(w_words + offs_k[:, None] * (N // PACK) + offs_w[None, :], mask=keep[:, None] & w_mask[None, :], other=0)
                    xs = tl.where(keep, x, 0.0)[:, None]
                    acc_0, acc_1, acc_2, acc_3 = add_word_products(acc_0, acc_1, acc_2, acc_3, w, xs, PACK)
                else:
                    w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None] & n_mask[None, :], other=0.0)
                    acc2 += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
            else:
                # Several tokens: a weight row is skipped only when every token's activation is under threshold.
                x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                            mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                if PER_CHANNEL:
                    x = tl.where(tl.abs(x) > thr[None, :], x, 0.0)
                else:
                    x = tl.where(tl.abs(x) > thr, x, 0.0)
                keep = tl.max(tl.abs(x), axis=0) > 0
                w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None] & n_mask[None, :], other=0.0)
                # Tensor-core product in the activations' dtype (x was bf16/fp16 before masking, so the cast back
                # is exact, and so is an int8 weight's) with fp32 accumulation; fp32 inputs take the ieee path.
                if DOT_FP32:
                    acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), acc)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # weights are all read: let the next kernel launch and wait
    if PACK > 1:
        acc = sum_word_columns(acc_0, acc_1, acc_2, acc_3, PACK, BLOCK_N)[None, :]
    elif BLOCK_T == 1:
        # One token: products were accumulated elementwise; reduce over K once, at the end.
        acc = tl.sum(acc2, axis=0)[None, :]
    if SCALED:
        # int8 weights: one scale per output column, so it comes out of the sum over K and is applied once here.
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]

    out_ptrs = offs_t[:, None] * stride_yt + offs_n[None, :]
    out_mask = t_mask[:, None] & n_mask[None, :]
    part_ptrs = part_ptr + offs_t[:, None] * N + offs_n[None, :]  # split 0's partial; split s's at + s * T * N
    if REDUCE and SPLIT_K == 1:
        tl.store(y_ptr + out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Without REDUCE the fp32 partial sums are the output; whoever reads them adds them up (sparse_gemv_partials).
        tl.store(part_ptrs + pid_k * T * N, acc, mask=out_mask)
        if REDUCE:
            tl.debug_barrier()  # every thread's partial is written before the counter says so
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                total = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(part_ptrs + s * T * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + out_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch (and the next graph replay)


@triton.jit
def load_inputs(x_ptr, offs, mask, norm_ptr, rs, NORM: tl.constexpr, X_CACHE: tl.constexpr):
    """A GEMV's inputs at offs, fp32: x, or with NORM the RMS-normalised residual stream x_ptr points at, as
    model.RMSNorm rounds it (the stream times rs, its reciprocal root mean square, rounded to the stream's dtype, times
    the norm's weights at norm_ptr, rounded again). X_CACHE: the loads' cache modifier."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, cache_modifier=X_CACHE).to(tl.float32)
    if NORM:
        dtype = x_ptr.dtype.element_ty
        w = tl.load(norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = ((x * rs).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
    return x


@triton.jit
def add_word_products(acc_0, acc_1, acc_2, acc_3, w, xv, PACK: tl.constexpr):
    """acc_b += xv * column b of the int32 words w: PACK 2 reads bf16 pairs (acc_2, acc_3 untouched), 4 int8 quads."""
    if PACK == 2:
        w_lo, w_hi = _widen_bf16_pairs(w)
        acc_0 += xv * w_lo
        acc_1 += xv * w_hi
    else:
        w0, w1, w2, w3 = _widen_int8_quads(w)
        acc_0 += xv * w0
        acc_1 += xv * w1
        acc_2 += xv * w2
        acc_3 += xv * w3
    return acc_0, acc_1, acc_2, acc_3


@triton.jit
def sum_word_columns(acc_0, acc_1, acc_2, acc_3, PACK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The products add_word_products accumulated, reduced over K once, at the end, and put back in column order:
    [BLOCK_N] fp32."""
    if PACK == 2:  # interleave the even and odd columns
        acc = tl.join(tl.sum(acc_0, axis=0), tl.sum(acc_1, axis=0))
    else:  # [j, p, q] = column 4j + 2p + q: byte 2p + q of word j
        acc = tl.join(tl.join(tl.sum(acc_0, axis=0), tl.sum(acc_2, axis=0)),
                      tl.join(tl.sum(acc_1, axis=0), tl.sum(acc_3, axis=0)))
    return tl.reshape(acc, (BLOCK_N,))


@triton.jit
def _widen_bf16_pairs(w):
    """int32 words holding two bf16 values -> (low, high) as fp32. A bf16 is the top half of its fp32, so widening
    is a shift (low half) or a mask (high half): one integer op per element, where a conversion takes 1.5."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _widen_int8_quads(w):
    """int32 words holding four int8 values -> their bytes 0..3 as fp32. Each byte, made unsigned (b + 128), is written
    into the low mantissa bits of 2^23 (one logic op: (w & 0xFF) ^ 0x4B000080), which reads as the float
    2^23 + 128 + b exactly; one subtraction leaves b. Two cheap ops per element (and a shift), where the int8
    conversion issues at a quarter of the FMA rate."""
    magic = 0x4B000080
    return (((w & 0xFF) ^ magic).to(tl.float32, bitcast=True) - 8388736.0,
            (((w >> 8) & 0xFF) ^ magic).to(tl.float32, bitcast=True) - 8388736.0,
            (((w >> 16) & 0xFF) ^ magic).to(tl.float32, bitcast=True) - 8388736.0,
            (((w >> 24) & 0xFF) ^ magic).to(tl.float32, bitcast=True) - 8388736.0)


def pick_config(k: int, split_sizes, compact: bool, sms: int, reduce: bool = True, int8: bool = False) -> dict:
    """Tile, K split and variant, by rule rather than autotuning (a shape's config is fixed before its first launch,
    which CUDA graphs capture): four warps and three pipeline stages; kept-row lists take 128 x 64 tiles at about
    1.5-2 programs per SM; predicated loads take 64 x 128 tiles at about 3.4 programs per SM where N is wide enough
    to give each SM 1.4 strips of 64, and narrow tall 32 x 256 tiles at 1.5-2 programs per SM below that, except
    where the strips alone give every SM one program and K is short: there the split's reduction costs more than a
    second program per SM gains. Without that in-kernel reduction (reduce=False: the partial sums are the output)
    the split has no such tail. Not autotuned: in-isolation timings picked configs that ran slower inside the decode
    graph, and the best config depends on the sparsity, which the tuning key cannot see. int8 weights take the same
    tiles, except on long K that is not wide (down projections), whose 32-column strips are 32-byte rows of int8:
    64 x 256 tiles split to about 1.4 programs per SM."""
    wide = sum(triton.cdiv(s, 64) for s in split_sizes) >= 1.4 * sms
    if compact:
        bn, bk, target = 128, 64, 1.4 * sms
    elif wide:
        bn, bk, target = 64, 128, 2.5 * sms
    elif int8 and k >= 8192:  # int8 down projections
        bn, bk, target = 64, 256, 1.4 * sms
    else:
        bn, bk, target = 32, 256, 1.4 * sms
    strips = sum(triton.cdiv(s, bn) for s in split_sizes)
    one_short_wave = reduce and not (compact or wide) and 0.9 * sms <= strips <= sms and k <= 4096
    split = 1
    while not one_short_wave and strips * split < target and split < MAX_SPLIT_K and k // (2 * split) >= bk:
        split *= 2
    # Without the reduction a grid that gives a few SMs two programs and the rest one is worth splitting once more.
    if not reduce and not compact and sms < strips * split <= 1.5 * sms and k // (2 * split) >= bk:
        split *= 2
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "COMPACT": compact, "STAGES": 3, "num_warps": 4}


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def reserve_workspace(device: torch.device, in_features: int, out_features: int) -> None:
    """Split-K completion counters (self-resetting) and kept-row lists, one pair of buffers per device.
    SparseLinear calls this at construction, before any torch.compile / CUDA-graph warm-up, so the
    buffers live outside the graph's memory pool and every captured launch sees stable addresses."""
    _workspace(torch.device(device), in_features, out_features)


def _workspace(device: torch.device, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    counters, rows = _workspaces.get(device, (None, None))
    need_counters, need_rows = triton.cdiv(n, 16) + 3, 3 * k
    if counters is None or counters.numel() < need_counters or rows.numel() < need_rows:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"sparse_gemv: workspace for K={k}, N={n} was not reserved before CUDA-graph capture; "
                               "call sparse_gemv.kernels.reserve_workspace(device, K, N) first")
        size_c = max(need_counters, 1 << 14, counters.numel() if counters is not None else 0)
        size_r = max(need_rows, 3 << 15, rows.numel() if rows is not None else 0)
        counters = torch.zeros(size_c, dtype=torch.int32, device=device)
        rows = torch.zeros(size_r, dtype=torch.int32, device=device)
        _workspaces[device] = (counters, rows)
    return counters, rows


def check_launch(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, scales: torch.Tensor | None,
                 out: torch.Tensor | None, config: dict | None) -> None:
    """What the kernel's pointer arithmetic assumes beyond check_inputs: unit strides, an output it can write and
    meta-parameters that make a grid."""
    if x.stride(1) != 1 or not thresholds.is_contiguous() or (scales is not None and not scales.is_contiguous()):
        raise ValueError("sparse_gemv: x must have unit stride along K, and thresholds and scales must be contiguous; "
                         "pass x.contiguous()")
    if not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"sparse_gemv: the kernel takes 1 to {MAX_TOKENS} tokens, got {x.shape[0]}")
    if out is not None and (tuple(out.shape) != (x.shape[0], weight_t.shape[1]) or out.dtype != x.dtype
                            or out.stride(1) != 1 or out.device != x.device):
        raise ValueError(f"sparse_gemv: out must be [{x.shape[0]}, {weight_t.shape[1]}] in {x.dtype} on {x.device} "
                         f"with unit column stride, got {tuple(out.shape)} {out.dtype} on {out.device}")
    for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "STAGES", "num_warps", "BLOCK_T"):
        if config is not None and key in config and not (isinstance(config[key], int) and config[key] >= 1):
            raise ValueError(f"sparse_gemv: config {key}={config[key]!r} must be a positive integer")


def sparse_gemv_triton(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, split_sizes,
                       out: torch.Tensor | None = None, compact: bool = False, config: dict | None = None,
                       reduce: bool = True, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel. x: [T<=8, K]; weight_t: [K, N] in x's dtype, or int8 with scales (fp32 [N], one per output
    column: y = (masked x @ weight_t) * scales); thresholds: fp32 [G] or [G, K]; out: optional [T, N].
    compact: list kept rows first (faster above about 70% sparsity, slower below). config: explicit
    meta-parameters (BLOCK_N, BLOCK_K, SPLIT_K, COMPACT, STAGES, num_warps) instead of pick_config's.
    reduce=False: return the split-K partial sums, fp32 [SPLIT_K, T, N], for the caller to add up (and y is unused)."""
    check_inputs(x, weight_t, thresholds, split_sizes, scales)
    check_launch(x, weight_t, thresholds, scales, out, config)
    t, k = x.shape
    n = weight_t.shape[1]
    n0, n1 = (list(split_sizes) + [0, 0])[:2]
    if len(split_sizes) == 1:
        n0, n1 = n, 0
    elif len(split_sizes) == 2:
        n1 = n - n0
    meta = dict(config or default_config(x.device, k, split_sizes, compact, reduce, weight_t.dtype == torch.int8))
    warps = meta.pop("num_warps", 4)
    # BLOCK_T 1: one token, elementwise products summed over K at the end; 16: a tensor-core product with
    # the tokens padded to 16 rows (any T <= 8; for one token it trades registers for idle MMA rows).
    block_t = meta.pop("BLOCK_T", 1 if t == 1 else 16)
    if block_t < t:
        raise ValueError(f"sparse_gemv: BLOCK_T={block_t} is fewer than the {t} tokens")
    if config is None and not INTERPRET:
        meta["STAGES"] = fit_stages(meta, block_t, weight_t.element_size(), x.element_size(), _max_shared(x.device))
    use_pdl = pdl_launch(x.device)
    partials = torch.empty((meta["SPLIT_K"], t, n), dtype=torch.float32, device=x.device)
    counters, rows = _workspace(x.device, k, n)
    if not reduce and out is not None:
        raise ValueError("sparse_gemv: with reduce=False the partial sums are the output, there is no out to write")
    if reduce:
        y = torch.empty((t, n), dtype=x.dtype, device=x.device) if out is None else out
    else:
        y = partials[0]  # not written: the kernel stores partial sums only
    args = (x, weight_t, thresholds, y, partials, counters, rows, thresholds if scales is None else scales,
            t, k, n, n0, n1, x.stride(0), y.stride(0))
    flags = {"PER_CHANNEL": thresholds.dim() == 2, "SCALED": scales is not None, "BLOCK_T": block_t,
             "DOT_FP32": fp32_products(x.dtype), "USE_PDL": use_pdl,
             "PACK": 1 if block_t > 1 else 2 if paired_bf16_loads(weight_t, split_sizes)
             else 4 if int8_quad_loads(weight_t, split_sizes) else 1,
             "EVEN_N": all(s % meta["BLOCK_N"] == 0 for s in split_sizes), "REDUCE": reduce,
             # rows listed at a time by the compact variant (the predicated one takes 1, so it compiles once)
             "LIST_CHUNK": min(MAX_LIST_CHUNK, triton.next_power_of_2(k_range(k, meta["SPLIT_K"], meta["BLOCK_K"])))
             if meta["COMPACT"] else 1}
    grid = (sum(triton.cdiv(s, meta["BLOCK_N"]) for s in split_sizes), meta["SPLIT_K"])
    _sparse_gemv_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=1, launch_pdl=use_pdl)
    return y if reduce else partials


def k_range(k: int, split: int, block_k: int) -> int:
    """Input channels per K split, as the kernel divides them: a whole number of BLOCK_K tiles."""
    return triton.cdiv(triton.cdiv(k, split), block_k) * block_k


def fit_stages(meta: dict, block_t: int, weight_bytes: int, x_bytes: int, max_shared: int) -> int:
    """The deepest pipeline, up to meta's STAGES, whose buffers fit a block's shared memory. Each stage buffers a
    weight tile, the tokens' activations and (compact) the row indices; counted in full for every stage, this is an
    upper bound on what Triton allocates. Every picked config keeps its depth on an A100 (163 KB) or H100 (227 KB);
    in the 99 KB of sm_86/sm_89 GPUs (A6000, L40) fp32 weights take two stages (with several tokens, three needed
    112 KB: tests/compile_launches.py builds every launch for each architecture)."""
    per_stage = meta["BLOCK_K"] * (meta["BLOCK_N"] * weight_bytes + block_t * x_bytes + 4)
    return max(1, min(meta["STAGES"], max_shared // per_stage))


def default_config(device: torch.device, k: int, split_sizes, compact: bool, reduce: bool = True,
                   int8: bool = False) -> dict:
    """The launch's meta-parameters unless the caller gives them (its SPLIT_K is how many partials reduce=False returns)."""
    if INTERPRET:  # small tiles, and a K split whenever K allows one, so CPU tests reach the reduction
        return {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2 if k >= 4 * 32 else 1, "COMPACT": compact, "STAGES": 1}
    return pick_config(k, split_sizes, compact, _sm_count(device), reduce, int8)


def paired_bf16_loads(weight_t: torch.Tensor, split_sizes) -> bool:
    """Whether one-token launches read this weight as int32 pairs of bf16 (PACK=2): every group must start on an
    even column and the weight on a 4-byte boundary, so no pair straddles two groups or an alignment."""
    return weight_t.dtype == torch.bfloat16 and all(s % 2 == 0 for s in split_sizes) and weight_t.data_ptr() % 4 == 0


def int8_quad_loads(weight_t: torch.Tensor, split_sizes) -> bool:
    """Whether one-token launches read this int8 weight as int32 words of four columns (PACK=4): every group must start
    on a multiple of four columns and the weight on a 4-byte boundary, so no word straddles two groups."""
    return weight_t.dtype == torch.int8 and all(s % 4 == 0 for s in split_sizes) and weight_t.data_ptr() % 4 == 0


def fp32_products(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take fp32 operands: fp32 inputs need the full-precision product, and the interpreter
    (seen with Triton 3.9) multiplies bf16 operands wrongly, so under it bf16 also goes through fp32 (the same
    exact products). Shared by the sparse GEMV and the attention kernel."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels on this device launch with programmatic dependent launch (PDL switched on, Hopper+, compiled)."""
    return PDL and not INTERPRET and _has_pdl(device)


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _max_shared(device: torch.device) -> int:
    """Shared memory one block may use, in bytes: the limit Triton checks a launch against."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
