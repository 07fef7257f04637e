"""Every decoder layer of a one-token decode step in one persistent Triton kernel: the `teal::decode_layers` op.

The per-layer step is some 290 kernels (a sparse GEMV per projection, the norms, attention, SwiGLU), each paying a
launch, a wake-up and a tail. Here one launch of as many programs as the GPU holds at once runs them all, layer after
layer, in phases:

    embed (layer 0): the token's embedding row starts the residual stream
    qkv:  sparse GEMV of the attention norm's output (q, k and v thresholds), strips ordered by KV head; the
          epilogue adds q/k/v biases (Qwen2)
    attn: per KV head: q/k norms (Qwen3), RoPE, the cache write, attention over positions 0..pos
    o:    sparse GEMV of the attention output; the strip's epilogue adds it to the residual stream
    gu:   sparse GEMV of the FFN norm's output, gate and up strips of the same columns side by side; the epilogue
          writes silu(gate) * up
    down: sparse GEMV of that; the epilogue adds it to the stream (the last layer leaves the stream, which the
          model's final norm and LM head read)

The norms are not a step of their own: the strips that write the stream (o's, down's, the embedding) leave the sum of
squares of their columns, and each q/k/v and gate/up tile, once every strip of the stream is written, normalises the
rows it reads itself. So no one program's whole-vector pass stands between two phases.

A GEMV tile reads the weights as the per-layer kernels store them: in the activations' dtype, int8 with a scale per
output column, or group-wise quantized (grouped.py's 4-bit and 8-bit layouts, dequantized in registers by its device
functions; a tile's rows are then whole groups, and a group's scales are read only when one of its rows is kept).

A GEMV phase is cut into tiles (a strip of output columns by a slice of input rows) handed out by an atomic ticket per
phase, so SMs that get more bandwidth take more tiles. A tile stores its fp32 partial sum; the strip's last tile (an
atomic count) adds the strip's partials in order and runs the epilogue. Dependencies are counters in global memory
(release on the producer's side, acquire on the waiter's), and a tile waits only for what it reads: an attention tile
for its KV head's q/k/v strips, an o tile for the heads of its row slice, a down tile for the gate/up strips of its
row slice; a q/k/v or gate/up tile for every strip of the stream it normalises.

Tiles are taken in order and only wait for tiles handed out before them, so the launch cannot deadlock while every
program is resident at once: the launch checks its grid against what the compiled kernel's registers and shared memory
let the GPU hold before it starts. Each wait is bounded: past MAX_SPIN polls it sets an error flag and gives up, so a
bug ends the launch with garbage and a flag (DecodeLayers.check) rather than a hung GPU.

Stepped mode runs the same tile code as one launch per phase with one program per tile and no waits: the kernel
boundary is the dependency. Under TRITON_INTERPRET (CPU tests) programs run one after another, where a spin-wait
would never return, so there it is the only mode; on a GPU it is a debugging switch.

The math and its roundings are the model's eager decode step (model.py, sparse.py, attention.py): projections
rounded to the activations' dtype, residual adds and norms as model.RMSNorm does them, RoPE and attention as
teal::decode_attention. The kernel knows layer shapes and weight layouts only: the caller stacks every layer's tensors
([n_layer, ...], generate.persistent_layers) and passes the caches, the RoPE table and the embedding table.
"""
import copy
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sparse_gemv.attention_tiles import attend, load_qkv, rms_norm_pairs, rope, rotate
from sparse_gemv.grouped import add_group_products, word_columns
from sparse_gemv.kernels import INTERPRET, add_word_products, fp32_products, load_inputs, sum_word_columns
from sparse_gemv.quant import GROUP_SIZES, out_features

EMBED, QKV, ATTN, O, GU, DOWN = (tl.constexpr(i) for i in range(6))  # the phases, in order
PHASES = ("embed", "qkv", "attn", "o", "gu", "down")
# Polls of one wait before it gives up and flags an error: seconds on an H100. Under the interpreter a persistent
# launch is one program, which takes every tile in order, so whatever it waits for is done: one poll would do.
MAX_SPIN = 4 if INTERPRET else 1 << 22
TILE_BYTES = 64 << 10  # weight bytes per GEMV tile: the granularity at which a phase's last SM finishes
MAX_PROGRAMS_PER_SM = 4
# Strip width of group-wise quantized weights (launch's grouped_strip, where the widths allow): a 4-bit row of it is
# 128 bytes (a cache line, as a 64-column bf16 strip is) and a 128-row group 16 KB, which 4 warps load in 8 slabs of
# 16 rows, 16 bytes a thread, each thread loading the group's scales of its 32 columns once for all 8.
GROUPED_STRIP = 256
# A GEMV tile's row loop is bound by each iteration's latency (x, its threshold test, the weight load it masks): an
# iteration takes block_rows rows (group-wise weights: a group) with all loads in flight, unpipelined (stages; the
# interpreter ignores it), and the register cap (max_registers; 0: the compiler's) fits 4 programs of 4 warps an SM.
BLOCK_ROWS = 256
STAGES = 1
MAX_REGISTERS = 128


@triton.jit
def _wait(flag_ptr, expected, err_ptr, prof_ptr, MAX_SPIN: tl.constexpr, PROFILE: tl.constexpr):
    """Spin until the counter at flag_ptr reaches expected, then acquire what its producers released. At most MAX_SPIN
    polls, fewer once another wait has failed: then it sets the error flag and returns. PROFILE: add the nanoseconds
    waited to prof_ptr[2] (the tile's phase's slot)."""
    if PROFILE:
        start = tl.extra.cuda.globaltimer()
    seen = tl.load(flag_ptr, volatile=True)
    spins = 0
    while (seen < expected) & (spins < MAX_SPIN):
        seen = tl.load(flag_ptr, volatile=True)
        failed = tl.load(err_ptr, volatile=True)
        spins = tl.where(failed != 0, MAX_SPIN, spins + 1)
    if seen < expected:
        tl.atomic_xchg(err_ptr, 1)
    tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    if PROFILE:
        tl.atomic_add(prof_ptr + 2, tl.extra.cuda.globaltimer() - start, sem="relaxed")


@triton.jit
def _signal(flag_ptr):
    """Count this program's stores (all of its threads', hence the barrier) as done for whoever waits on flag_ptr."""
    tl.debug_barrier()
    tl.atomic_add(flag_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _gemv_rows(x_ptr, norm_ptr, rs, w_ptr, thr_ptr, scale_ptr, zero_ptr, col, group, k_begin, k_stop, K: tl.constexpr,
               N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr,
               PACK: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr, STAGES: tl.constexpr, WARPS: tl.constexpr,
               NORM: tl.constexpr):
    """fp32 [BLOCK_N]: x[k] * w[k, col:col + BLOCK_N] summed over the rows k in [k_begin, k_stop) whose |x[k]| is over
    the group's threshold (the other rows' weights are not loaded). x: the [K] activations, written by another program
    of this launch (read past L1), or with NORM the residual stream, RMS-normalised here (rs, norm_ptr: load_inputs');
    w: [K, N] (PACK 2: bf16 read as int32 pairs, 4: int8 as int32 quads), or with BITS 4 / 8 group-wise quantized in
    grouped.py's layout with fp16 scales (and ZERO: zeros) [ceil(K / BLOCK_K), N]: BLOCK_K is the group size and
    k_begin a group's first row, so each tile of rows is one group, taken by grouped.py's add_group_products in slabs
    whose rows the program's WARPS warps load 16 bytes a thread."""
    # Accumulators of bf16/fp32/int8 products: per row up to 64 rows an iteration, reduced over K once at the end.
    # Past that (a tile's rows in few iterations, all of their loads in flight at once), int8 keeps the rows one pass of
    # the threads loads (16 bytes a thread) and folds each thread's rows into them, so no sum crosses threads before
    # the end; bf16 and fp32 reduce across the program every iteration, which is faster for bf16 (benchmark/RESULTS.md).
    ACC_ROWS: tl.constexpr = (BLOCK_K if BLOCK_K <= 64 else
                              min(BLOCK_K, max(1, 4 * 32 * WARPS // (BLOCK_N // PACK))) if PACK == 4 else 1)
    if PER_CHANNEL:
        thr = thr_ptr + group * K  # the group's thresholds, one a row
    else:
        thr = tl.load(thr_ptr + group)
    if BITS > 0:
        PER_WORD: tl.constexpr = 32 // BITS  # columns per int32 word
        WORDS: tl.constexpr = BLOCK_N // PER_WORD
        ROWS: tl.constexpr = min(BLOCK_K, max(1, 4 * 32 * WARPS // WORDS))  # four words a thread
        word0 = col // PER_WORD  # col: a multiple of the strip width
        if WORDS % 4 == 0:  # a strip's row is whole 16-byte vectors, loaded four words a thread
            word0 = tl.multiple_of(word0, 4)
        offs_w = word0 + tl.arange(0, WORDS)
        words_at = w_ptr.to(tl.pointer_type(tl.int32)) + offs_w[None, :]
        columns = PER_WORD * offs_w.to(tl.int64)
        all_words = tl.full((WORDS,), 1, tl.int1)
        acc_0 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_1 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_2 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_3 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_4 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_5 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_6 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
        acc_7 = tl.zeros((ROWS, WORDS), dtype=tl.float32)
    elif PACK > 1:
        w_words = w_ptr.to(tl.pointer_type(tl.int32))
        offs_w = col // PACK + tl.arange(0, BLOCK_N // PACK)
        acc_0 = tl.zeros((ACC_ROWS, BLOCK_N // PACK), dtype=tl.float32)
        acc_1 = tl.zeros((ACC_ROWS, BLOCK_N // PACK), dtype=tl.float32)
        acc_2 = tl.zeros((ACC_ROWS, BLOCK_N // PACK), dtype=tl.float32)
        acc_3 = tl.zeros((ACC_ROWS, BLOCK_N // PACK), dtype=tl.float32)
    else:
        offs_n = col + tl.arange(0, BLOCK_N)
        acc = tl.zeros((ACC_ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_stop, BLOCK_K, num_stages=STAGES):
        if BITS > 0:
            acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7 = add_group_products(
                acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_ptr, thr, k0, k_stop, words_at,
                N // PER_WORD, all_words, scale_ptr, zero_ptr, N, columns, PER_CHANNEL, BITS, ZERO, BLOCK_K, ROWS,
                ".cg", norm_ptr, rs, NORM)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_stop
            x = load_inputs(x_ptr, offs_k, k_mask, norm_ptr, rs, NORM, ".cg")
            if PER_CHANNEL:
                keep = tl.abs(x) > tl.load(thr + offs_k, mask=k_mask, other=float("inf"))
            else:
                keep = tl.abs(x) > thr
            xs = tl.where(keep, x, 0.0)[:, None]
            if PACK > 1:
                w = tl.load(w_words + offs_k[:, None] * (N // PACK) + offs_w[None, :], mask=keep[:, None], other=0)
                if ACC_ROWS == BLOCK_K:
                    acc_0, acc_1, acc_2, acc_3 = add_word_products(acc_0, acc_1, acc_2, acc_3, w, xs, PACK)
                else:
                    p_0, p_1, p_2, p_3 = add_word_products(0.0, 0.0, 0.0, 0.0, w, xs, PACK)
                    acc_0 += _fold_rows(p_0, acc_0)
                    acc_1 += _fold_rows(p_1, acc_1)
                    if PACK == 4:
                        acc_2 += _fold_rows(p_2, acc_2)
                        acc_3 += _fold_rows(p_3, acc_3)
            else:
                w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=keep[:, None], other=0.0)
                acc += _fold_rows(xs * w.to(tl.float32), acc)
    if BITS > 0:
        total = word_columns(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, BITS, BLOCK_N)
    elif PACK > 1:
        total = sum_word_columns(acc_0, acc_1, acc_2, acc_3, PACK, BLOCK_N)
    else:
        total = tl.sum(acc, axis=0)
    return total


@triton.jit
def _fold_rows(products, acc):
    """products [R, words] added up into acc's shape [ROWS, words], row i into row i % ROWS: as they are when R is
    ROWS; into one row, a sum across the program's threads; into the rows of one load pass, a sum inside each thread
    (its rows are ROWS apart)."""
    ROWS: tl.constexpr = acc.shape[0]
    if products.shape[0] == ROWS:
        return products
    if ROWS == 1:
        return tl.sum(products, axis=0, keep_dims=True)
    return tl.sum(tl.reshape(products, (products.shape[0] // ROWS, ROWS, products.shape[1])), axis=0)


@triton.jit
def _scaled(acc, scale_ptr, col, SCALED: tl.constexpr, BLOCK_N: tl.constexpr):
    """int8 weights: the columns' scales, applied to the sum over K once."""
    if SCALED:
        acc *= tl.load(scale_ptr + col + tl.arange(0, BLOCK_N))
    return acc


@triton.jit
def _strip_sum(part_ptr, col, N: tl.constexpr, KS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The KS partial sums [KS, N] of a strip's columns, added in order (the same sum whichever tile came last)."""
    offs = col + tl.arange(0, BLOCK_N)
    total = tl.load(part_ptr + offs, cache_modifier=".cg")
    for s in range(1, KS):
        total += tl.load(part_ptr + s * N + offs, cache_modifier=".cg")
    return total


@triton.jit
def _add_to_stream(total, resid_ptr, stats_ptr, strip, col, BLOCK_N: tl.constexpr):
    """The epilogue of o and down: the projection rounded to the stream's dtype, added to the residual stream (rounded
    once more), and the strip's sum of squares of the new stream for the norm after it. Returns the new stream."""
    offs = col + tl.arange(0, BLOCK_N)
    dtype = resid_ptr.dtype.element_ty
    h = (tl.load(resid_ptr + offs, cache_modifier=".cg").to(tl.float32) + total.to(dtype).to(tl.float32)).to(dtype)
    tl.store(resid_ptr + offs, h)
    hf = h.to(tl.float32)
    tl.store(stats_ptr + strip, tl.sum(hf * hf, axis=0))
    return h


@triton.jit
def _stream_rs(stats_ptr, NS: tl.constexpr, eps, D: tl.constexpr, BLOCK_STATS: tl.constexpr):
    """The reciprocal root mean square of the residual stream (model.RMSNorm's), from its NS strips' sums of squares
    at stats_ptr, added in one order: every tile that normalises the stream gets the same bits."""
    offs = tl.arange(0, BLOCK_STATS)
    sum_sq = tl.sum(tl.load(stats_ptr + offs, mask=offs < NS, other=0.0, cache_modifier=".cg"), axis=0)
    return tl.math.rsqrt(sum_sq / D + eps)


@triton.jit
def _rope_qk(ptrs, mask, cos, sin, norm_ptrs, norm_mask, eps, HD: tl.constexpr, dtype: tl.constexpr,
             QK_NORM: tl.constexpr):
    """q or k heads at ptrs (even elements) rotated by RoPE; with QK_NORM, each head RMS-normalised first (Qwen3's
    q/k norm, weights at norm_ptrs), as model.Attention.norm_qk does before the attention op."""
    if QK_NORM:
        even = load_qkv(ptrs, mask, 0, 0, dtype, ".cg")
        odd = load_qkv(ptrs + 1, mask, 0, 0, dtype, ".cg")
        even, odd = rms_norm_pairs(even, odd, norm_ptrs, norm_mask, eps, HD, dtype)
        rotated = rotate(even, odd, cos, sin, dtype)
    else:
        rotated = rope(ptrs, mask, cos, sin, 0, 0, dtype, ".cg")
    return rotated


@triton.jit
def _tile(PH: tl.constexpr, layer, tile, WAIT: tl.constexpr, rs,
          tok_ptr, pos_ptr, freqs_ptr, emb_ptr, normw_ptr, wqkv_ptr, wo_ptr, w13_ptr, w2_ptr,
          tqkv_ptr, to_ptr, t13_ptr, t2_ptr, sqkv_ptr, so_ptr, s13_ptr, s2_ptr, zqkv_ptr, zo_ptr, z13_ptr, z2_ptr,
          bqkv_ptr, qkn_ptr, kc_ptr, vc_ptr, out_ptr, qkv_ptr, y_ptr, g_ptr, resid_ptr, pqkv_ptr, po_ptr,
          pgu_ptr, pd_ptr, stats_ptr, ctr_ptr, err_ptr, prof_ptr, eps, sm_scale, stride_cl, stride_ch, stride_cs,
          L: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, I: tl.constexpr,
          BN_QKV: tl.constexpr, KR_QKV: tl.constexpr, BN_O: tl.constexpr, KR_O: tl.constexpr,
          BN_GU: tl.constexpr, KR_GU: tl.constexpr, BN_D: tl.constexpr, KR_D: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NORM: tl.constexpr,
          BLOCK_STATS: tl.constexpr, PER_CHANNEL: tl.constexpr, SCALED: tl.constexpr, PACK: tl.constexpr,
          BITS: tl.constexpr, ZERO: tl.constexpr, STAGES: tl.constexpr, WARPS: tl.constexpr,
          DOT_FP32: tl.constexpr, MAX_SPIN: tl.constexpr, PROFILE: tl.constexpr, QKV_BIAS: tl.constexpr,
          QK_NORM: tl.constexpr, TS_QKV: tl.constexpr, TS_O: tl.constexpr, TS_GU: tl.constexpr, TS_D: tl.constexpr):
    """Phase PH's tile number `tile` of layer `layer` (WAIT: first wait for what it reads; PROFILE: count the wait in
    prof_ptr's slot of the layer and phase; QKV_BIAS: add bqkv_ptr's [L, NQKV] biases to q, k and v; QK_NORM: normalise
    each q and k head before RoPE with qkn_ptr's [L, 2, HD] weights; TS_*: the layer stride of each projection's
    thresholds). rs: 0, or the stream's reciprocal root mean square as this program's last tile of the same q/k/v or
    gate/up phase found it, after waiting for every strip of the stream (so neither the wait nor the sums are
    repeated). Returns rs for the program's next tile."""
    dtype = resid_ptr.dtype.element_ty
    REP: tl.constexpr = H // HKV
    NQKV: tl.constexpr = (H + 2 * HKV) * HD
    # per-layer counters: phase tickets, stream strips ready for the two norms, strip tickets, KV heads ready,
    # attention done, gate/up strips ready per row slice of down
    NS_QKV: tl.constexpr = NQKV // BN_QKV
    NS_O: tl.constexpr = D // BN_O
    NS_GU: tl.constexpr = I // BN_GU
    NS_D: tl.constexpr = D // BN_D
    KS_QKV: tl.constexpr = (D + KR_QKV - 1) // KR_QKV
    KS_O: tl.constexpr = (H * HD + KR_O - 1) // KR_O
    KS_GU: tl.constexpr = (D + KR_GU - 1) // KR_GU
    KS_D: tl.constexpr = (I + KR_D - 1) // KR_D
    # group-wise quantized weights (BITS > 0): a row of N columns takes N / PER_BYTE bytes, and the fp16 scales and
    # zeros are [groups of BLOCK_K rows, N] per layer
    PER_BYTE: tl.constexpr = 2 if BITS == 4 else 1
    G_D: tl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    G_O: tl.constexpr = (H * HD + BLOCK_K - 1) // BLOCK_K
    G_I: tl.constexpr = (I + BLOCK_K - 1) // BLOCK_K
    C_NORM_READY: tl.constexpr = 6  # the attention norm's and the FFN norm's stream strips written
    C_STRIP_QKV: tl.constexpr = 8
    C_STRIP_O: tl.constexpr = C_STRIP_QKV + NS_QKV
    C_STRIP_GU: tl.constexpr = C_STRIP_O + NS_O
    C_STRIP_D: tl.constexpr = C_STRIP_GU + NS_GU
    C_QKV_READY: tl.constexpr = C_STRIP_D + NS_D
    C_ATTN_DONE: tl.constexpr = C_QKV_READY + HKV
    C_GU_READY: tl.constexpr = C_ATTN_DONE + HKV
    C_SIZE: tl.constexpr = C_GU_READY + KS_D
    ctr = ctr_ptr + layer * C_SIZE
    prof = prof_ptr + (layer * 6 + PH) * 4
    layer64 = tl.full([], 0, tl.int64) + layer  # 64-bit offsets: the stacked weights pass 2^31 elements
    if PH == EMBED:
        # h = the token's embedding row (the stream starts there: no residual yet)
        tok = tl.load(tok_ptr).to(tl.int64)
        sum_sq = 0.0
        for d0 in range(0, D, BLOCK_NORM):  # not unrolled: no whole-vector tensors held for the launch
            offs = d0 + tl.arange(0, BLOCK_NORM)
            h = tl.load(emb_ptr + tok * D + offs, mask=offs < D, other=0.0)
            tl.store(resid_ptr + offs, h, mask=offs < D)
            sum_sq += tl.sum(h.to(tl.float32) * h.to(tl.float32), axis=0)
        # the sum of squares where down's strips leave theirs for the next layer's attention norm (one strip)
        offs = tl.arange(0, BLOCK_STATS)
        tl.store(stats_ptr + NS_O + offs, tl.where(offs == 0, sum_sq, 0.0), mask=offs < NS_D)
        _signal(ctr + C_NORM_READY)
    elif PH == QKV:
        # strips ordered by KV head: head g's q strips, its k strips, its v strips, so attention of the first heads
        # can start while the last heads' strips load
        PER_Q: tl.constexpr = REP * HD // BN_QKV
        PER_HEAD: tl.constexpr = (REP + 2) * HD // BN_QKV
        strip = tile // KS_QKV
        split = tile % KS_QKV
        g = strip // PER_HEAD
        r = strip % PER_HEAD
        group = (r >= PER_Q).to(tl.int32) + (r >= PER_Q + HD // BN_QKV).to(tl.int32)
        col = tl.where(group == 0, g * REP * HD + r * BN_QKV,
                       tl.where(group == 1, H * HD + g * HD + (r - PER_Q) * BN_QKV,
                                (H + HKV) * HD + g * HD + (r - PER_Q - HD // BN_QKV) * BN_QKV))
        if rs == 0.0:
            if WAIT:  # the stream's strips: the embedding (layer 0) or the last layer's down strips
                _wait(ctr + C_NORM_READY, tl.where(layer == 0, 1, NS_D), err_ptr, prof, MAX_SPIN, PROFILE)
            rs = _stream_rs(stats_ptr + NS_O, NS_D, eps, D, BLOCK_STATS)
        k_begin = split * KR_QKV
        acc = _gemv_rows(resid_ptr, normw_ptr + 2 * layer * D, rs, wqkv_ptr + layer64 * D * (NQKV // PER_BYTE),
                         tqkv_ptr + layer * TS_QKV, sqkv_ptr + layer * G_D * NQKV,
                         zqkv_ptr + layer * G_D * NQKV, col, group, k_begin, tl.minimum(k_begin + KR_QKV, D), D, NQKV,
                         BN_QKV, BLOCK_K, PER_CHANNEL, PACK, BITS, ZERO, STAGES, WARPS, True)
        acc = _scaled(acc, sqkv_ptr + layer * NQKV, col, SCALED, BN_QKV)
        tl.store(pqkv_ptr + split * NQKV + col + tl.arange(0, BN_QKV), acc)
        tl.debug_barrier()
        if tl.atomic_add(ctr + C_STRIP_QKV + strip, 1, sem="acq_rel", scope="gpu") == KS_QKV - 1:
            total = _strip_sum(pqkv_ptr, col, NQKV, KS_QKV, BN_QKV)
            if QKV_BIAS:  # the product rounded, then the bias added in the dtype, as SparseLinear adds it
                bias = tl.load(bqkv_ptr + layer * NQKV + col + tl.arange(0, BN_QKV)).to(tl.float32)
                total = total.to(dtype).to(tl.float32) + bias
            tl.store(qkv_ptr + col + tl.arange(0, BN_QKV), total.to(dtype))
            _signal(ctr + C_QKV_READY + g)
    elif PH == ATTN:
        kvh = tile
        if WAIT:
            _wait(ctr + C_QKV_READY + kvh, (REP + 2) * HD // BN_QKV, err_ptr, prof, MAX_SPIN, PROFILE)
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < REP
        heads = kvh * REP + offs_h
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HD
        offs_p = tl.arange(0, BLOCK_D // 2)
        p_mask = offs_p < HD // 2
        pos = tl.load(pos_ptr)
        cos = tl.load(freqs_ptr + pos * HD + 2 * offs_p, mask=p_mask, other=0.0)
        sin = tl.load(freqs_ptr + pos * HD + 2 * offs_p + 1, mask=p_mask, other=0.0)
        qk_norm = qkn_ptr + layer * 2 * HD + 2 * offs_p  # the q norm's even elements; the k norm's HD further
        q = _rope_qk(qkv_ptr + heads[:, None] * HD + 2 * offs_p[None, :], h_mask[:, None] & p_mask[None, :],
                     cos[None, :], sin[None, :], qk_norm[None, :], p_mask[None, :], eps, HD, dtype,
                     QK_NORM).reshape(BLOCK_H, BLOCK_D)
        k_base = kc_ptr + layer64 * stride_cl + kvh * stride_ch
        v_base = vc_ptr + layer64 * stride_cl + kvh * stride_ch
        k_new = _rope_qk(qkv_ptr + (H + kvh) * HD + 2 * offs_p, p_mask, cos, sin, qk_norm + HD, p_mask, eps, HD, dtype,
                         QK_NORM).reshape(BLOCK_D)
        tl.store(k_base + pos * stride_cs + offs_d, k_new, mask=d_mask)
        v_new = load_qkv(qkv_ptr + (H + HKV + kvh) * HD + offs_d, d_mask, 0, 0, dtype, ".cg").to(dtype)
        tl.store(v_base + pos * stride_cs + offs_d, v_new, mask=d_mask)
        tl.debug_barrier()  # the new row is visible to every thread of this program before it is read back
        m, l, acc = attend(q, k_base, v_base, 0, pos + 1, stride_cs, offs_d, d_mask, sm_scale, BLOCK_H, BLOCK_D,
                           BLOCK_S, DOT_FP32)
        out = acc / l[:, None]  # l > 0: position 0..pos always holds the new token
        tl.store(y_ptr + heads[:, None] * HD + offs_d[None, :], out.to(dtype), mask=h_mask[:, None] & d_mask[None, :])
        _signal(ctr + C_ATTN_DONE + kvh)
    elif PH == O:
        # split-major: the first tiles read the first heads' outputs
        split = tile // NS_O
        strip = tile % NS_O
        col = strip * BN_O
        k_begin = split * KR_O
        k_stop = tl.minimum(k_begin + KR_O, H * HD)
        if WAIT:
            for kvh in range(k_begin // HD // REP, (k_stop - 1) // HD // REP + 1):
                _wait(ctr + C_ATTN_DONE + kvh, 1, err_ptr, prof, MAX_SPIN, PROFILE)
        acc = _gemv_rows(y_ptr, y_ptr, 1.0, wo_ptr + layer64 * H * HD * (D // PER_BYTE),
                         to_ptr + layer * TS_O, so_ptr + layer * G_O * D,
                         zo_ptr + layer * G_O * D, col, 0, k_begin, k_stop, H * HD, D, BN_O, BLOCK_K, PER_CHANNEL,
                         PACK, BITS, ZERO, STAGES, WARPS, False)
        acc = _scaled(acc, so_ptr + layer * D, col, SCALED, BN_O)
        tl.store(po_ptr + split * D + col + tl.arange(0, BN_O), acc)
        tl.debug_barrier()
        if tl.atomic_add(ctr + C_STRIP_O + strip, 1, sem="acq_rel", scope="gpu") == KS_O - 1:
            total = _strip_sum(po_ptr, col, D, KS_O, BN_O)
            _add_to_stream(total, resid_ptr, stats_ptr, strip, col, BN_O)
            _signal(ctr + C_NORM_READY + 1)
    elif PH == GU:
        # gate strip j and up strip j side by side: the epilogue has both halves of silu(gate) * up
        strip = tile // KS_GU
        split = tile % KS_GU
        col = strip * BN_GU
        if rs == 0.0:
            if WAIT:
                _wait(ctr + C_NORM_READY + 1, NS_O, err_ptr, prof, MAX_SPIN, PROFILE)
            rs = _stream_rs(stats_ptr, NS_O, eps, D, BLOCK_STATS)
        k_begin = split * KR_GU
        k_stop = tl.minimum(k_begin + KR_GU, D)
        w = w13_ptr + layer64 * D * (2 * I // PER_BYTE)
        thr = t13_ptr + layer * TS_GU
        scales = s13_ptr + layer * G_D * 2 * I
        zeros = z13_ptr + layer * G_D * 2 * I
        norm = normw_ptr + (2 * layer + 1) * D
        gate = _gemv_rows(resid_ptr, norm, rs, w, thr, scales, zeros, col, 0, k_begin, k_stop, D, 2 * I, BN_GU,
                          BLOCK_K, PER_CHANNEL, PACK, BITS, ZERO, STAGES, WARPS, True)
        up = _gemv_rows(resid_ptr, norm, rs, w, thr, scales, zeros, I + col, 1, k_begin, k_stop, D, 2 * I, BN_GU,
                        BLOCK_K, PER_CHANNEL, PACK, BITS, ZERO, STAGES, WARPS, True)
        gate = _scaled(gate, s13_ptr + layer * 2 * I, col, SCALED, BN_GU)
        up = _scaled(up, s13_ptr + layer * 2 * I, I + col, SCALED, BN_GU)
        tl.store(pgu_ptr + split * 2 * I + col + tl.arange(0, BN_GU), gate)
        tl.store(pgu_ptr + split * 2 * I + I + col + tl.arange(0, BN_GU), up)
        tl.debug_barrier()
        if tl.atomic_add(ctr + C_STRIP_GU + strip, 1, sem="acq_rel", scope="gpu") == KS_GU - 1:
            gate = _strip_sum(pgu_ptr, col, 2 * I, KS_GU, BN_GU).to(dtype).to(tl.float32)
            up = _strip_sum(pgu_ptr, I + col, 2 * I, KS_GU, BN_GU).to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            tl.store(g_ptr + col + tl.arange(0, BN_GU), (silu * up).to(dtype))
            _signal(ctr + C_GU_READY + col // KR_D)
    else:  # DOWN, split-major like o
        split = tile // NS_D
        strip = tile % NS_D
        col = strip * BN_D
        k_begin = split * KR_D
        k_stop = tl.minimum(k_begin + KR_D, I)
        if WAIT:
            _wait(ctr + C_GU_READY + split, (k_stop - k_begin) // BN_GU, err_ptr, prof, MAX_SPIN, PROFILE)
        acc = _gemv_rows(g_ptr, g_ptr, 1.0, w2_ptr + layer64 * I * (D // PER_BYTE),
                         t2_ptr + layer * TS_D, s2_ptr + layer * G_I * D,
                         z2_ptr + layer * G_I * D, col, 0, k_begin, k_stop, I, D, BN_D, BLOCK_K, PER_CHANNEL, PACK,
                         BITS, ZERO, STAGES, WARPS, False)
        acc = _scaled(acc, s2_ptr + layer * D, col, SCALED, BN_D)
        tl.store(pd_ptr + split * D + col + tl.arange(0, BN_D), acc)
        tl.debug_barrier()
        if tl.atomic_add(ctr + C_STRIP_D + strip, 1, sem="acq_rel", scope="gpu") == KS_D - 1:
            total = _strip_sum(pd_ptr, col, D, KS_D, BN_D)
            h = _add_to_stream(total, resid_ptr, stats_ptr + NS_O, strip, col, BN_D)
            if layer == L - 1:
                tl.store(out_ptr + col + tl.arange(0, BN_D), h)
            else:
                _signal(ctr + C_SIZE + C_NORM_READY)  # a strip of the next layer's attention norm
    return rs


@triton.jit
def _decode_layers_kernel(tok_ptr, pos_ptr, freqs_ptr, emb_ptr, normw_ptr, wqkv_ptr, wo_ptr, w13_ptr, w2_ptr,
                          tqkv_ptr, to_ptr, t13_ptr, t2_ptr, sqkv_ptr, so_ptr, s13_ptr, s2_ptr, zqkv_ptr, zo_ptr,
                          z13_ptr, z2_ptr, bqkv_ptr, qkn_ptr, kc_ptr, vc_ptr, out_ptr, qkv_ptr, y_ptr, g_ptr,
                          resid_ptr, pqkv_ptr, po_ptr, pgu_ptr, pd_ptr, stats_ptr, ctr_ptr, err_ptr, prof_ptr,
                          step_layer, eps, sm_scale, stride_cl, stride_ch, stride_cs,
                          L: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                          I: tl.constexpr, BN_QKV: tl.constexpr, KR_QKV: tl.constexpr, BN_O: tl.constexpr,
                          KR_O: tl.constexpr, BN_GU: tl.constexpr, KR_GU: tl.constexpr, BN_D: tl.constexpr,
                          KR_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_NORM: tl.constexpr, BLOCK_STATS: tl.constexpr,
                          PER_CHANNEL: tl.constexpr, SCALED: tl.constexpr, PACK: tl.constexpr, BITS: tl.constexpr,
                          ZERO: tl.constexpr, STAGES: tl.constexpr, WARPS: tl.constexpr, DOT_FP32: tl.constexpr,
                          MAX_SPIN: tl.constexpr, C_SIZE: tl.constexpr,
                          NT_QKV: tl.constexpr, NT_O: tl.constexpr, NT_GU: tl.constexpr, NT_D: tl.constexpr,
                          PROFILE: tl.constexpr, QKV_BIAS: tl.constexpr, QK_NORM: tl.constexpr,
                          TS_QKV: tl.constexpr, TS_O: tl.constexpr, TS_GU: tl.constexpr, TS_D: tl.constexpr,
                          PHASE: tl.constexpr):
    """PHASE >= 0 (stepped): tile program_id of that phase of layer step_layer. PHASE < 0 (persistent): every phase
    of every layer, each phase's tiles taken from its ticket (NT_*: tiles per phase, C_SIZE: counters per layer).
    PROFILE (persistent): per layer and phase, prof_ptr [L, 6, 4] int64 gets the first tile's start and the last one's
    end (globaltimer ns), and the nanoseconds its tiles spent waiting and in all (summed over programs)."""
    if PHASE >= 0:
        _tile(PHASE, step_layer, tl.program_id(0), False, 0.0,
              tok_ptr, pos_ptr, freqs_ptr, emb_ptr, normw_ptr, wqkv_ptr, wo_ptr, w13_ptr, w2_ptr,
              tqkv_ptr, to_ptr, t13_ptr, t2_ptr, sqkv_ptr, so_ptr, s13_ptr, s2_ptr, zqkv_ptr, zo_ptr, z13_ptr, z2_ptr,
              bqkv_ptr, qkn_ptr, kc_ptr, vc_ptr, out_ptr, qkv_ptr, y_ptr, g_ptr, resid_ptr, pqkv_ptr, po_ptr,
              pgu_ptr, pd_ptr, stats_ptr, ctr_ptr, err_ptr, prof_ptr, eps, sm_scale, stride_cl, stride_ch, stride_cs,
              L, D, H, HKV, HD, I, BN_QKV, KR_QKV, BN_O, KR_O, BN_GU, KR_GU, BN_D, KR_D, BLOCK_K, BLOCK_S, BLOCK_H,
              BLOCK_D, BLOCK_NORM, BLOCK_STATS, PER_CHANNEL, SCALED, PACK, BITS, ZERO, STAGES, WARPS, DOT_FP32,
              MAX_SPIN, False, QKV_BIAS, QK_NORM, TS_QKV, TS_O, TS_GU, TS_D)
    else:
        for layer in range(L):
            for ph in tl.static_range(6):
                if ph == EMBED:
                    n = tl.where(layer == 0, 1, 0)
                elif ph == QKV:
                    n = NT_QKV
                elif ph == ATTN:
                    n = HKV
                elif ph == O:
                    n = NT_O
                elif ph == GU:
                    n = NT_GU
                else:
                    n = NT_D
                t = tl.atomic_add(ctr_ptr + layer * C_SIZE + ph, 1, sem="relaxed", scope="gpu")
                rs = 0.0
                while t < n:
                    # the next ticket is taken before this tile runs, so its latency hides behind the tile's loads
                    # (a tile held meanwhile is still behind every tile it waits for: no deadlock)
                    t_next = tl.atomic_add(ctr_ptr + layer * C_SIZE + ph, 1, sem="relaxed", scope="gpu")
                    if PROFILE:
                        start = tl.extra.cuda.globaltimer()
                    rs = _tile(ph, layer, t, True, rs,
                               tok_ptr, pos_ptr, freqs_ptr, emb_ptr, normw_ptr, wqkv_ptr, wo_ptr, w13_ptr, w2_ptr,
                               tqkv_ptr, to_ptr, t13_ptr, t2_ptr, sqkv_ptr, so_ptr, s13_ptr, s2_ptr, zqkv_ptr, zo_ptr,
                               z13_ptr, z2_ptr, bqkv_ptr, qkn_ptr, kc_ptr, vc_ptr, out_ptr, qkv_ptr, y_ptr, g_ptr,
                               resid_ptr, pqkv_ptr, po_ptr, pgu_ptr, pd_ptr, stats_ptr, ctr_ptr, err_ptr, prof_ptr, eps,
                               sm_scale, stride_cl, stride_ch, stride_cs,
                               L, D, H, HKV, HD, I, BN_QKV, KR_QKV, BN_O, KR_O, BN_GU, KR_GU, BN_D, KR_D, BLOCK_K,
                               BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_NORM, BLOCK_STATS, PER_CHANNEL, SCALED, PACK, BITS,
                               ZERO, STAGES, WARPS, DOT_FP32, MAX_SPIN, PROFILE, QKV_BIAS, QK_NORM, TS_QKV, TS_O,
                               TS_GU, TS_D)
                    if PROFILE:
                        end = tl.extra.cuda.globaltimer()
                        slot = prof_ptr + (layer * 6 + ph) * 4
                        tl.atomic_min(slot, start, sem="relaxed")
                        tl.atomic_max(slot + 1, end, sem="relaxed")
                        tl.atomic_add(slot + 3, end - start, sem="relaxed")
                    t = t_next


def _divisor_block(n: int, most: int) -> int:
    """The largest power of two up to `most` that divides n (a GEMV strip never straddles a head or a group)."""
    block = most
    while n % block:
        block //= 2
    if block < 4:
        raise ValueError(f"persistent decode: {n} has no power-of-two divisor of at least 4 for a strip of columns")
    return block


def tile_config(dim: int, n_head: int, head_dim: int, inter: int, weight_bytes: float,
                tile_bytes: int = TILE_BYTES, group_size: int = 0, grouped_strip: int = GROUPED_STRIP,
                block_rows: int = BLOCK_ROWS) -> dict:
    """Tile shapes by rule: strips of 64 columns and TILE_BYTES of weights per tile (weight_bytes: per weight, 0.5 at
    4 bits), its rows a whole number of BLOCK_K rows (a down tile's also of gate/up strips, which it waits for).
    BLOCK_K is block_rows, or the group size of group-wise quantized weights (a row tile is one group), whose strips are
    grouped_strip columns where the widths allow. Under the interpreter, where every program costs milliseconds, a tile
    takes all rows of its strip except down's, split in two so partial sums are added."""
    strip, block_k = (grouped_strip, group_size) if group_size else (64, block_rows)
    bn_qkv, bn_o, bn_gu, bn_d = (_divisor_block(head_dim, strip), _divisor_block(dim, strip),
                                 _divisor_block(inter, strip), _divisor_block(dim, strip))

    def rows(bn, k, align=block_k):
        wanted = k if INTERPRET else int(tile_bytes / (bn * weight_bytes))
        return min(max(align, wanted // align * align), triton.cdiv(k, align) * align)
    kr_d = rows(bn_d, triton.cdiv(inter, 2) if INTERPRET else inter, max(block_k, bn_gu))
    return {"BN_QKV": bn_qkv, "KR_QKV": rows(bn_qkv, dim), "BN_O": bn_o, "KR_O": rows(bn_o, n_head * head_dim),
            "BN_GU": bn_gu, "KR_GU": rows(2 * bn_gu, dim), "BN_D": bn_d, "KR_D": kr_d, "BLOCK_K": block_k}


def layout(cfg: dict, dim: int, n_head: int, n_kv_heads: int, head_dim: int, inter: int) -> dict:
    """Tiles per phase and counters per layer for a tile_config (the counters _tile lays out)."""
    nqkv = (n_head + 2 * n_kv_heads) * head_dim
    ks = {p: triton.cdiv(k, cfg[f"KR_{p}"]) for p, k in
          (("QKV", dim), ("O", n_head * head_dim), ("GU", dim), ("D", inter))}
    strips = {"QKV": nqkv // cfg["BN_QKV"], "O": dim // cfg["BN_O"], "GU": inter // cfg["BN_GU"],
              "D": dim // cfg["BN_D"]}
    return {**{f"NT_{p}": strips[p] * ks[p] for p in ks},
            "C_SIZE": 8 + sum(strips.values()) + 2 * n_kv_heads + ks["D"],
            "BLOCK_STATS": triton.next_power_of_2(max(strips["O"], strips["D"])), "stats": strips["O"] + strips["D"],
            "splits": ks}


@functools.cache
def _device_limits(index: int) -> tuple[int, int, int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, p.regs_per_multiprocessor, p.shared_memory_per_multiprocessor, \
        p.max_threads_per_multi_processor


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def resident_programs(n_regs: int, shared: int, num_warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel the GPU holds at once: per SM the fewest that its registers (allocated
    per warp in units of 256), shared memory (plus the 1 KB the driver reserves per block) and threads allow."""
    sms, regs, smem, threads = _device_limits(_index(device))
    regs_per_warp = triton.cdiv(n_regs * 32, 256) * 256
    per_sm = min(regs // (regs_per_warp * num_warps), smem // (shared + 1024), threads // (32 * num_warps), 32)
    return sms * per_sm


@torch.library.custom_op("teal::decode_layers", mutates_args=("k_caches", "v_caches", "errors", "profile"))
def decode_layers(token: torch.Tensor, input_pos: torch.Tensor, freqs_cis: torch.Tensor, embedding: torch.Tensor,
                  norm_weights: torch.Tensor, weights: list[torch.Tensor], thresholds: list[torch.Tensor],
                  scales: list[torch.Tensor], zeros: list[torch.Tensor], group_size: int, k_caches: torch.Tensor,
                  v_caches: torch.Tensor, errors: torch.Tensor, profile: Optional[torch.Tensor], eps: float,
                  programs: int, stepped: bool,
                  tile_bytes: int = TILE_BYTES, num_warps: int = 4, max_registers: int = MAX_REGISTERS,
                  grouped_strip: int = GROUPED_STRIP, stages: int = STAGES, block_rows: int = BLOCK_ROWS,
                  qkv_biases: Optional[torch.Tensor] = None,
                  qk_norm_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every decoder layer of one decode step: the residual stream after the last layer, [1, 1, dim].

    token [1, 1] at input_pos [1]; freqs_cis: the RoPE table [positions, head_dim / 2, 2] fp32; embedding [vocab, dim];
    norm_weights [n_layer, 2, dim] (attention norm, FFN norm); weights: wqkv [n_layer, dim, (H + 2 H_kv) head_dim],
    wo [n_layer, H head_dim, dim], w13 [n_layer, dim, 2 inter], w2 [n_layer, inter, dim], in the kernels' [K, N] layout,
    in the activations' dtype or int8 with scales (fp32 [n_layer, N] each), or with group_size > 0 group-wise
    quantized in sparse_gemv/grouped.py's layout (4 bits: uint8 [n_layer, K, N / 2]; 8 bits: int8 [n_layer, K, N])
    with fp16 scales and, or none, zeros [n_layer, ceil(K / group_size), N]; thresholds fp32 [n_layer, groups] or
    [n_layer, groups, K] (groups 3, 1, 2, 1), each layer's contiguous, at any layer stride; k_caches / v_caches
    [n_layer, 1, H_kv, positions, head_dim], written at input_pos; errors: int32 [1], set to 1 when a wait gave up.
    programs: the persistent grid (0: as many as are resident, up to MAX_PROGRAMS_PER_SM per SM); stepped: one launch
    per phase instead (under TRITON_INTERPRET always, but for programs=1: the persistent loop as one program).
    tile_bytes, num_warps, max_registers (0: the compiler's choice), grouped_strip (group-wise weights' columns per
    strip), stages (software-pipelining depth of the GEMV tiles' row loop) and block_rows (rows of bf16/fp32/int8
    weights an iteration of that loop) tune the launch; profile: None, or int64 [n_layer, 6, 4] to fill with the
    persistent launch's phase timings (_decode_layers_kernel's PROFILE). Mutated arguments have no defaults: torch
    2.11's ADInplaceOrView kernel indexes the arguments as passed, and trailing defaults are not passed. Qwen2:
    qkv_biases [n_layer, (H + 2 H_kv) head_dim], added to q, k and v; Qwen3: qk_norm_weights [n_layer, 2, head_dim]
    (q norm, k norm), each head of q and k RMS-normalised with them before RoPE (eps, as the layer norms); both in the
    embedding's dtype."""
    check_inputs(token, input_pos, freqs_cis, embedding, norm_weights, weights, thresholds, scales, zeros, group_size,
                 k_caches, v_caches, qkv_biases, qk_norm_weights)
    if not (token.is_cuda or INTERPRET):
        raise RuntimeError("teal::decode_layers runs Triton kernels: it needs a CUDA device, or TRITON_INTERPRET=1 "
                           "on the CPU (stepped mode)")
    return launch(token, input_pos, freqs_cis, embedding, norm_weights, weights, thresholds, scales, zeros,
                  group_size, k_caches, v_caches, errors, eps, programs, stepped or (INTERPRET and programs != 1),
                  tile_bytes, num_warps, max_registers, profile, qkv_biases, qk_norm_weights, grouped_strip, stages,
                  block_rows)


@decode_layers.register_fake
def _(token, input_pos, freqs_cis, embedding, norm_weights, weights, thresholds, scales, zeros, group_size, k_caches,
      v_caches, errors, profile, eps, programs, stepped, tile_bytes=TILE_BYTES, num_warps=4,
      max_registers=MAX_REGISTERS, grouped_strip=GROUPED_STRIP, stages=STAGES, block_rows=BLOCK_ROWS, qkv_biases=None,
      qk_norm_weights=None):
    return embedding.new_empty((1, 1, embedding.shape[1]))


def check_inputs(token, input_pos, freqs_cis, embedding, norm_weights, weights, thresholds, scales, zeros, group_size,
                 k_caches, v_caches, qkv_biases=None, qk_norm_weights=None) -> None:
    if token.numel() != 1 or k_caches.dim() != 5 or k_caches.shape[1] != 1:
        raise ValueError(f"decode_layers: one token of one sequence (batch 1), got token {tuple(token.shape)} and "
                         f"caches {tuple(k_caches.shape)}; the persistent engine decodes batch 1 only")
    if len(weights) != 4 or len(thresholds) != 4 or len(scales) not in (0, 4) or len(zeros) not in (0, 4):
        raise ValueError("decode_layers: weights and thresholds are (wqkv, wo, w13, w2), scales and zeros those four "
                         "or none")
    n_layer, dim = norm_weights.shape[0], embedding.shape[1]
    hkv, head_dim = k_caches.shape[2], k_caches.shape[4]
    wqkv, wo, w13, w2 = weights
    per_byte = 2 if wqkv.dtype == torch.uint8 else 1  # 4-bit weights: two columns a byte
    inter = out_features(w13) // 2
    n_head = out_features(wqkv) // head_dim - 2 * hkv
    shapes = [(wqkv, (n_layer, dim, (n_head + 2 * hkv) * head_dim // per_byte)),
              (wo, (n_layer, n_head * head_dim, dim // per_byte)), (w13, (n_layer, dim, 2 * inter // per_byte)),
              (w2, (n_layer, inter, dim // per_byte)), (norm_weights, (n_layer, 2, dim)),
              (v_caches, tuple(k_caches.shape)), (qkv_biases, (n_layer, out_features(wqkv))),
              (qk_norm_weights, (n_layer, 2, head_dim))]
    for t, shape in shapes:
        if t is not None and (tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"decode_layers: expected a contiguous {shape}, got {tuple(t.shape)} (the layers' tensors "
                             f"stacked: [n_layer, K, N] weights, [n_layer, 2, dim] norms, equal caches, [n_layer, N] "
                             f"q/k/v biases, [n_layer, 2, head_dim] q/k norms)")
    if n_head <= 0 or n_head % hkv or head_dim % 2 or out_features(wqkv) % head_dim:
        raise ValueError(f"decode_layers: q/k/v width {out_features(wqkv)} does not fit {hkv} KV heads of {head_dim}")
    int8 = wqkv.dtype == torch.int8 and not group_size
    dtype = embedding.dtype
    if group_size:
        check_grouped(weights, scales, zeros, group_size, (dim, head_dim, inter))
    elif any((w.dtype == torch.int8) != int8 or (not int8 and w.dtype != dtype) for w in weights) or \
            bool(scales) != int8 or zeros:
        raise TypeError("decode_layers: weights in the embedding's dtype, all int8 with scales, or group-wise "
                        "quantized (group_size > 0)")
    if any(t is not None and t.dtype != dtype for t in (k_caches, norm_weights, qkv_biases, qk_norm_weights)):
        raise TypeError("decode_layers: caches, norms and biases in the embedding's dtype")
    for t, w, g in zip(thresholds, weights, (3, 1, 2, 1)):
        if t.dtype != torch.float32 or tuple(t.shape) not in ((n_layer, g), (n_layer, g, w.shape[1])) \
                or t.dim() != thresholds[0].dim() or not t[0].is_contiguous() or t.stride(0) < t[0].numel():
            raise ValueError(f"decode_layers: thresholds fp32 [n_layer, {g}] or [n_layer, {g}, K], all of one kind, "
                             f"each layer's contiguous, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    for s, w in zip(scales if int8 else (), weights):
        if s.dtype != torch.float32 or tuple(s.shape) != (n_layer, w.shape[2]) or not s.is_contiguous():
            raise ValueError(f"decode_layers: int8 scales contiguous fp32 [n_layer, N], got {tuple(s.shape)} "
                             f"{s.dtype}")
    if tuple(freqs_cis.shape) != (k_caches.shape[3], head_dim // 2, 2) or freqs_cis.dtype != torch.float32:
        raise ValueError(f"decode_layers: freqs_cis must be the fp32 RoPE table [{k_caches.shape[3]}, "
                         f"{head_dim // 2}, 2], got {tuple(freqs_cis.shape)} {freqs_cis.dtype}")


def check_grouped(weights, scales, zeros, group_size: int, widths) -> None:
    """Group-wise quantized weights (sparse_gemv/grouped.py's layout, stacked): all 4-bit or all 8-bit, fp16 scales
    and zeros [n_layer, ceil(K / group_size), N], and every strip of columns (a divisor of head_dim, dim or the
    intermediate size) in whole int32 words."""
    bits = {torch.uint8: 4, torch.int8: 8}.get(weights[0].dtype)
    if group_size not in GROUP_SIZES or bits is None or any(w.dtype != weights[0].dtype for w in weights):
        raise TypeError(f"decode_layers: group-wise weights are all uint8 (4-bit) or all int8 (8-bit), in groups of "
                        f"{GROUP_SIZES}; got {[w.dtype for w in weights]} in groups of {group_size}")
    if not scales:
        raise TypeError("decode_layers: group-wise quantized weights need their scales")
    for name, tensors in (("scales", scales), ("zeros", zeros)):
        for t, w in zip(tensors, weights):
            shape = (w.shape[0], triton.cdiv(w.shape[1], group_size), out_features(w))
            if t.dtype != torch.float16 or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"decode_layers: {name} of group-wise weights are contiguous fp16 {shape}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
    if any(n % (32 // bits) for n in widths):
        raise ValueError(f"decode_layers: {bits}-bit weights need dim, head_dim and the intermediate size multiples of "
                         f"{32 // bits} (whole int32 words), got {tuple(widths)}")


_resident: dict = {}  # compiled kernel's key -> programs resident at once


def launch(token, input_pos, freqs_cis, embedding, norm_weights, weights, thresholds, scales, zeros, group_size: int,
           k_caches, v_caches, errors, eps: float, programs: int, stepped: bool, tile_bytes: int = TILE_BYTES,
           num_warps: int = 4, max_registers: int = MAX_REGISTERS, profile: torch.Tensor | None = None,
           qkv_biases: torch.Tensor | None = None, qk_norm_weights: torch.Tensor | None = None,
           grouped_strip: int = GROUPED_STRIP, stages: int = STAGES, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    if grouped_strip < 32 or grouped_strip & (grouped_strip - 1):
        raise ValueError(f"decode_layers: grouped_strip is a power of two of at least 32 columns, got {grouped_strip}")
    if stages < 1:
        raise ValueError(f"decode_layers: stages is the row loop's pipelining depth, at least 1, got {stages}")
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"decode_layers: block_rows is a power of two of at least 16 rows, got {block_rows}")
    device = embedding.device
    n_layer, dim = norm_weights.shape[0], embedding.shape[1]
    hkv, head_dim = k_caches.shape[2], k_caches.shape[4]
    wqkv, wo, w13, w2 = weights
    inter = out_features(w13) // 2
    n_head = out_features(wqkv) // head_dim - 2 * hkv
    dtype = embedding.dtype
    bits = (4 if wqkv.dtype == torch.uint8 else 8) if group_size else 0
    cfg = tile_config(dim, n_head, head_dim, inter, bits / 8 if bits else wqkv.element_size(), tile_bytes, group_size,
                      grouped_strip, block_rows)
    lay = layout(cfg, dim, n_head, hkv, head_dim, inter)
    ks = lay["splits"]
    f32 = dict(dtype=torch.float32, device=device)
    counters = torch.zeros(n_layer * lay["C_SIZE"], dtype=torch.int32, device=device)
    out = torch.empty((1, 1, dim), dtype=dtype, device=device)
    qkv = torch.empty(out_features(wqkv), dtype=dtype, device=device)
    y = torch.empty(n_head * head_dim, dtype=dtype, device=device)
    g = torch.empty(inter, dtype=dtype, device=device)
    resid = torch.empty(dim, dtype=dtype, device=device)
    parts = [torch.empty((ks[p], n), **f32) for p, n in (("QKV", out_features(wqkv)), ("O", dim), ("GU", 2 * inter),
                                                           ("D", dim))]
    stats = torch.empty(lay["stats"], **f32)
    scale_args = scales if scales else thresholds
    zero_args = zeros if zeros else scale_args
    pack = 1 if bits else 2 if wqkv.dtype == torch.bfloat16 else 4 if wqkv.dtype == torch.int8 else 1
    args = (token, input_pos, freqs_cis, embedding, norm_weights, *weights, *thresholds, *scale_args, *zero_args,
            norm_weights if qkv_biases is None else qkv_biases,
            norm_weights if qk_norm_weights is None else qk_norm_weights, k_caches,
            v_caches, out, qkv, y, g, resid, *parts, stats, counters, errors,
            counters if profile is None else profile)
    meta = dict(L=n_layer, D=dim, H=n_head, HKV=hkv, HD=head_dim, I=inter, **cfg, BLOCK_S=64 if INTERPRET else 32,
                BLOCK_H=max(16, triton.next_power_of_2(n_head // hkv)), BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_NORM=min(1024, triton.next_power_of_2(dim)), BLOCK_STATS=lay["BLOCK_STATS"],
                PER_CHANNEL=thresholds[0].dim() == 3, SCALED=bool(scales) and not bits, PACK=pack, BITS=bits,
                ZERO=bool(zeros), STAGES=stages, WARPS=num_warps,
                DOT_FP32=fp32_products(dtype), MAX_SPIN=MAX_SPIN, C_SIZE=lay["C_SIZE"], PROFILE=profile is not None,
                QKV_BIAS=qkv_biases is not None, QK_NORM=qk_norm_weights is not None,
                **{k: t.stride(0) for k, t in zip(("TS_QKV", "TS_O", "TS_GU", "TS_D"), thresholds)},
                **{k: lay[k] for k in ("NT_QKV", "NT_O", "NT_GU", "NT_D")})
    runtime = (eps, head_dim ** -0.5, k_caches.stride(0), k_caches.stride(2), k_caches.stride(3))
    if stepped:
        tiles = (1, lay["NT_QKV"], hkv, lay["NT_O"], lay["NT_GU"], lay["NT_D"])  # per phase, EMBED to DOWN
        for layer in range(n_layer):
            for phase in range(0 if layer == 0 else 1, len(PHASES)):
                _decode_layers_kernel[(tiles[phase],)](*args, layer, *runtime, **meta, PHASE=phase,
                                                       num_warps=num_warps)
        return out
    options = dict(num_warps=num_warps, **({"maxnreg": max_registers} if max_registers else {}))
    if INTERPRET:  # one program, in order (programs == 1): the persistent loop's tickets and counters, on the CPU
        _decode_layers_kernel[(1,)](*args, 0, *runtime, **meta, PHASE=-1, **options)
        return out
    key = (device, tuple(sorted(meta.items())), tuple(sorted(options.items())))
    if key not in _resident:
        compiled = _decode_layers_kernel.warmup(*args, 0, *runtime, **meta, PHASE=-1, **options, grid=(1,))
        compiled._init_handles()
        _resident[key] = resident_programs(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                                           device)
    resident = _resident[key]
    if programs > resident:
        raise ValueError(f"decode_layers: a persistent grid of {programs} programs, but the GPU holds only {resident} "
                         f"of this kernel at once (its registers and shared memory); more would deadlock in the "
                         f"kernel's waits. Use at most {resident}, or 0 for that many")
    grid = programs or min(resident, MAX_PROGRAMS_PER_SM * _device_limits(_index(device))[0])
    if profile is not None:
        profile.view(-1, 4)[:, 0] = torch.iinfo(torch.int64).max
        profile.view(-1, 4)[:, 1:] = 0
    _decode_layers_kernel[(grid,)](*args, 0, *runtime, **meta, PHASE=-1, **options)
    return out


class DecodeLayers:
    """The decoder layers' tensors stacked for teal::decode_layers, and the call that runs one decode step through
    them: h = layers(token, input_pos, freqs_cis, embedding, k_caches, v_caches) is the residual stream after the last
    layer, for the model's final norm and LM head. Thresholds stay data: the stacked thresholds are the tensors the
    layers hold (their views), so a new sparsity is a copy into them. programs, stepped, tile_bytes, num_warps,
    max_registers, grouped_strip, stages, block_rows, qkv_biases and qk_norm_weights: teal::decode_layers'; zeros and
    group_size: those of group-wise quantized weights."""

    def __init__(self, norm_weights: torch.Tensor, weights, thresholds, scales, eps: float, programs: int = 0,
                 stepped: bool = False, tile_bytes: int = TILE_BYTES, num_warps: int = 4,
                 max_registers: int = MAX_REGISTERS,
                 qkv_biases: torch.Tensor | None = None, qk_norm_weights: torch.Tensor | None = None, zeros=(),
                 group_size: int = 0, grouped_strip: int = GROUPED_STRIP, stages: int = STAGES,
                 block_rows: int = BLOCK_ROWS):
        self.norm_weights, self.weights, self.thresholds = norm_weights, list(weights), list(thresholds)
        self.scales, self.zeros, self.group_size = list(scales or ()), list(zeros or ()), int(group_size)
        self.qkv_biases, self.qk_norm_weights = qkv_biases, qk_norm_weights
        self.eps, self.programs, self.stepped = float(eps), int(programs), bool(stepped)
        self.tuning = (int(tile_bytes), int(num_warps), int(max_registers), int(grouped_strip), int(stages),
                       int(block_rows))
        self.errors = torch.zeros(1, dtype=torch.int32, device=norm_weights.device)
        # Fixed addresses for CUDA graphs: without the mark, torch.compile's graphs would copy these inputs (every
        # weight of the model) into their own buffers on each replay, as they do for inputs that are not parameters.
        for t in (self.norm_weights, *self.weights, *self.thresholds, *self.scales, *self.zeros, self.errors,
                  qkv_biases, qk_norm_weights):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def __call__(self, token, input_pos, freqs_cis, embedding, k_caches, v_caches, profile=None) -> torch.Tensor:
        return torch.ops.teal.decode_layers(token, input_pos, freqs_cis, embedding, self.norm_weights, self.weights,
                                            self.thresholds, self.scales, self.zeros, self.group_size, k_caches,
                                            v_caches, self.errors, profile, self.eps, self.programs, self.stepped,
                                            *self.tuning, self.qkv_biases, self.qk_norm_weights)

    def launched(self, **launch) -> "DecodeLayers":
        """The same stacked tensors (and error flag) launched otherwise: any of programs, stepped, tile_bytes,
        num_warps, max_registers, grouped_strip, stages and block_rows changed. A copy, so no tensor the layers hold
        can be left out."""
        other = copy.copy(self)
        tuning = dict(zip(("tile_bytes", "num_warps", "max_registers", "grouped_strip", "stages", "block_rows"),
                          self.tuning))
        for name, value in launch.items():
            if name in tuning:
                tuning[name] = int(value)
            elif name in ("programs", "stepped"):
                setattr(other, name, type(getattr(self, name))(value))
            else:
                raise TypeError(f"DecodeLayers.launched: no launch setting {name!r}")
        other.tuning = tuple(tuning.values())
        return other

    def check(self) -> None:
        """Raise if a wait of an earlier step gave up (a dependency never came: a bug, never a slow GPU); syncs."""
        if int(self.errors.item()):
            raise RuntimeError("persistent decode: a wait for another program's output timed out; the steps since "
                               "are wrong (rerun with stepped=True to debug)")

    def profile(self, token, input_pos, freqs_cis, embedding, k_caches, v_caches) -> dict:
        """One persistent step with the kernel's phase timers on (a variant of its own, compiled once): per phase,
        summed over layers, the microseconds from its first tile's start to its last tile's end (span_us), and the
        program-microseconds its tiles took (busy_us) and spent waiting for their inputs (wait_us); step_us from the
        first tile's start to the last tile's end. Syncs."""
        prof = torch.empty((self.norm_weights.shape[0], len(PHASES), 4), dtype=torch.int64,
                           device=self.norm_weights.device)
        self(token, input_pos, freqs_cis, embedding, k_caches, v_caches, profile=prof)
        prof = prof.cpu()
        used = prof[..., 1] > 0  # embed runs in layer 0 only
        out = {"step_us": float(prof[..., 1][used].max() - prof[..., 0][used].min()) / 1e3, "phases": {}}
        for i, name in enumerate(PHASES):
            p = prof[:, i][used[:, i]]
            out["phases"][name] = {"span_us": float((p[:, 1] - p[:, 0]).sum()) / 1e3,
                                   "busy_us": float(p[:, 3].sum()) / 1e3, "wait_us": float(p[:, 2].sum()) / 1e3}
        return out
