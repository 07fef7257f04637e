"""Sparse GEMV for group-wise quantized weights: 4-bit (RTN, GGUF Q4_0 / Q4_1) and 8-bit (GGUF Q8_0).

Layout, as for the other weights, is [K, N] with input channels as rows, so a skipped input skips one contiguous
strip of bytes:
- 4 bits: uint8 [K, N / 2]; byte j of row k holds column 2j in its low nibble and 2j + 1 in its high nibble, so an
  int32 word holds eight consecutive columns (nibble i = column 8j + i, bits 4i..4i+3). Nibbles are unsigned
  (0..15); without zero points the weight is scale * (q - 8), with them scale * q + zero.
- 8 bits: int8 [K, N] (signed); the weight is scale * q (+ zero).
Scales (and zeros, the value of q = 0) are fp16 [ceil(K / group_size), N]: one per group of group_size input rows and
output channel, the precision GGUF stores them in, so its blocks repack into this layout without any rounding.

The kernel walks a program's K range one group at a time. Predicated: a group's tile of rows loads only the rows over
threshold, and its scales only when one of them is. Compact: the kept rows of the K range are listed first, with
where each group's kept rows start in the list; each group with a kept row loads its scales once and then only its
kept rows, in tiles of BLOCK_K. Weights are loaded as int32 words and dequantized in registers.

One token (the decode step) walks a tile in slabs of ROWS rows that the threads load four words (16 bytes) each, and
keeps each of a word's fields (nibbles, bytes) in its own accumulator, so no word is ever spread into columns until
the end and no sum crosses threads inside the loop. A field is isolated in the low mantissa bits of 2^23 by one AND,
reading as 2^23 + u * 2^shift (u the unsigned code, shift its place in its 16-bit half), and one fma with the
group's scale takes 2^23 off and scales in a single rounding: with the product with x, two fmas and an AND a
weight. The zero point (or the -8 / -128 that makes a code signed) is applied once a group, times the sum of the
group's kept x. Several tokens dequantize a tile to [BLOCK_K, BLOCK_N] (the 2^23 trick, then q * scale (+ zero),
dequantize_words) and take a tensor-core product per tile. Split-K and the partial-sum output work as in kernels.py.
The persistent decode kernel (persistent.py) reads the same layout one group at a time through add_group_products,
the predicated one-token tile's loop body.
"""
import torch
import triton
import triton.language as tl

from sparse_gemv import kernels
from sparse_gemv.kernels import (INTERPRET, MAX_LIST_CHUNK, MAX_SPLIT_K, fit_stages, fp32_products, k_range, load_inputs,
                                 pdl_launch)
from sparse_gemv.ops import check_inputs


@triton.jit
def _grouped_sparse_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, thr_ptr, y_ptr, part_ptr, count_ptr, rows_ptr,
                                T, K, N, N0, N1, stride_xt, stride_yt,
                                BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr,
                                PER_CHANNEL: tl.constexpr, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                                COMPACT: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                                EVEN_N: tl.constexpr, REDUCE: tl.constexpr, LIST_CHUNK: tl.constexpr,
                                ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS  # columns per int32 word
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    s0 = tl.cdiv(N0, BLOCK_N)
    s1 = tl.cdiv(N1, BLOCK_N)
    g = (pid_n >= s0).to(tl.int32) + (pid_n >= s0 + s1).to(tl.int32)
    g_start = tl.where(g == 0, 0, tl.where(g == 1, N0, N0 + N1))
    g_end = tl.where(g == 0, N0, tl.where(g == 1, N0 + N1, N))
    strip = pid_n - tl.where(g == 0, 0, tl.where(g == 1, s0, s0 + s1))
    offs_n = g_start + strip * BLOCK_N + tl.arange(0, BLOCK_N)
    word0 = (g_start + strip * BLOCK_N) // PER_WORD
    row_words = N // PER_WORD
    if ALIGNED:  # strips and rows start on 16 bytes: one-token tiles load four words at a time
        word0 = tl.multiple_of(word0, 4)
        row_words = tl.multiple_of(row_words, 4)
    offs_w = word0 + tl.arange(0, BLOCK_N // PER_WORD)
    if EVEN_N:
        n_mask = tl.full((BLOCK_N,), 1, tl.int1)
        w_mask = tl.full((BLOCK_N // PER_WORD,), 1, tl.int1)
    else:
        n_mask = offs_n < g_end
        w_mask = offs_w < g_end // PER_WORD
    w_words = w_ptr.to(tl.pointer_type(tl.int32))
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T

    # Every split's K range is a whole number of groups.
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), GROUP) * GROUP
    k_begin = pid_k * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, K)
    if PER_CHANNEL:
        thr_row = thr_ptr + g * K
    else:
        thr = tl.load(thr_ptr + g)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if BLOCK_T == 1:
        # One token: a tile is walked in slabs of ROWS rows, [ROWS, words], which the program's threads load
        # four words each; acc_f accumulates column PER_WORD * word + f of each slab row elementwise (an fma per
        # weight, no sum across threads until the end). acc_4..7 stay zero and unused at 8 bits.
        words_at = w_words + offs_w[None, :]
        w_mask2 = w_mask[None, :]
        columns = PER_WORD * offs_w.to(tl.int64)  # scale columns: int64, so each field's is an offset from them
        acc_0 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_1 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_2 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_3 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_4 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_5 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_6 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
        acc_7 = tl.zeros((ROWS, BLOCK_N // PER_WORD), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)

    if COMPACT:
        # Pass 1: list the kept rows of this split (as kernels.py does) and, for each group, where its kept rows
        # start in the list (chunks start on group boundaries, since splits do and LIST_CHUNK is a multiple of GROUP).
        slots = rows_ptr + g * K + k_begin
        starts = rows_ptr + 3 * K + g * tl.cdiv(K, GROUP)  # indexed by group number
        count = k_begin * 0
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
            per_group = tl.sum(tl.reshape(keep, (LIST_CHUNK // GROUP, GROUP)), axis=1)
            offs_g = c0 // GROUP + tl.arange(0, LIST_CHUNK // GROUP)
            tl.store(starts + offs_g, count + tl.cumsum(per_group, 0) - per_group, mask=offs_g * GROUP < k_stop)
            count += tl.sum(keep, 0)
        tl.debug_barrier()  # the lists are visible to every thread of this program before they are read
        g_first = k_begin // GROUP
        g_last = tl.cdiv(k_stop, GROUP)
        for grp in range(g_first, g_last):
            first = tl.load(starts + grp)
            last = tl.load(starts + grp + 1, mask=grp + 1 < g_last, other=count)
            if BLOCK_T == 1:
                mask = w_mask & (tl.zeros_like(offs_w) + first < last)  # the group's scales, once, if a row is kept
                s_0, s_1, s_2, s_3, s_4, s_5, s_6, s_7, z_0, z_1, z_2, z_3, z_4, z_5, z_6, z_7 = group_field_scales(
                    scale_ptr, zero_ptr, grp, N, columns, mask, BITS, ZERO)
                x_sum = tl.zeros((ROWS,), dtype=tl.float32)
                for j in tl.range(first, last, BLOCK_K, num_stages=STAGES):
                    for i in tl.static_range(BLOCK_K // ROWS):
                        offs_j = j + i * ROWS + tl.arange(0, ROWS)
                        valid = offs_j < last
                        rows = tl.load(rows_ptr + g * K + k_begin + offs_j, mask=valid, other=0)
                        x = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)
                        words = tl.load(words_at + rows[:, None] * row_words, mask=(x != 0)[:, None] & w_mask2,
                                        other=0)
                        x_sum += x
                        acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7 = add_slab_products(
                            acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, words, x,
                            s_0, s_1, s_2, s_3, s_4, s_5, s_6, s_7, BITS)
                acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7 = add_offsets(
                    acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_sum, z_0, z_1, z_2, z_3, z_4, z_5, z_6,
                    z_7, BITS)
            else:
                scale, zero = group_scales(scale_ptr, zero_ptr, grp, N, offs_n, n_mask, last - first, ZERO)
                for j in tl.range(first, last, BLOCK_K, num_stages=STAGES):
                    offs_j = j + tl.arange(0, BLOCK_K)
                    valid = offs_j < last
                    rows = tl.load(rows_ptr + g * K + k_begin + offs_j, mask=valid, other=0)
                    words = tl.load(w_words + rows[:, None] * row_words + offs_w[None, :],
                                    mask=valid[:, None] & w_mask[None, :], other=0)
                    w = dequantize_words(words, scale, zero, BITS, ZERO, BLOCK_K, BLOCK_N)
                    xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + rows[None, :],
                                 mask=t_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)
                    if PER_CHANNEL:
                        thr = tl.load(thr_row + rows, mask=valid, other=float("inf"))[None, :]
                    xv = tl.where(tl.abs(xv) > thr, xv, 0.0)
                    acc = _dot(xv, w, acc, DOT_FP32, x_ptr)
    else:
        # Predicated: one group per tile; rows under threshold are masked out of the weight load, and a group's
        # scales are loaded only when one of its rows is kept.
        for k0 in tl.range(k_begin, k_stop, BLOCK_K, num_stages=STAGES):
            if BLOCK_T == 1:
                acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7 = add_group_products(
                    acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_ptr, thr_row if PER_CHANNEL else thr, k0,
                    k_stop, words_at, row_words, w_mask, scale_ptr, zero_ptr, N, columns, PER_CHANNEL, BITS, ZERO,
                    BLOCK_K, ROWS, "", x_ptr, 1.0, False)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_stop
                if PER_CHANNEL:
                    thr = tl.load(thr_row + offs_k, mask=k_mask, other=float("inf"))
                x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                            mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                if PER_CHANNEL:
                    x = tl.where(tl.abs(x) > thr[None, :], x, 0.0)
                else:
                    x = tl.where(tl.abs(x) > thr, x, 0.0)
                keep = tl.max(tl.abs(x), axis=0) > 0
                words = tl.load(w_words + offs_k[:, None] * row_words + offs_w[None, :],
                                mask=keep[:, None] & w_mask[None, :], other=0)
                scale, zero = group_scales(scale_ptr, zero_ptr, k0 // GROUP, N, offs_n, n_mask,
                                           tl.sum(keep.to(tl.int32), 0), ZERO)
                w = dequantize_words(words, scale, zero, BITS, ZERO, BLOCK_K, BLOCK_N)
                acc = _dot(x, w, acc, DOT_FP32, x_ptr)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if BLOCK_T == 1:
        acc = word_columns(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, BITS, BLOCK_N)[None, :]

    out_ptrs = offs_t[:, None] * stride_yt + offs_n[None, :]
    out_mask = t_mask[:, None] & n_mask[None, :]
    part_ptrs = part_ptr + offs_t[:, None] * N + offs_n[None, :]
    if REDUCE and SPLIT_K == 1:
        tl.store(y_ptr + out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptrs + pid_k * T * N, acc, mask=out_mask)
        if REDUCE:
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                total = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(part_ptrs + s * T * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + out_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def group_scales(scale_ptr, zero_ptr, grp, N, offs_n, n_mask, kept, ZERO: tl.constexpr):
    """One group's fp16 scales (and zeros) for the strip's columns, as fp32; nothing is read unless kept > 0 (the
    group's kept rows)."""
    mask = n_mask & (tl.zeros_like(offs_n) + kept > 0)  # a block comparison: the interpreter mishandles scalar masks
    scale = tl.load(scale_ptr + grp * N + offs_n, mask=mask, other=0.0).to(tl.float32)
    if ZERO:
        zero = tl.load(zero_ptr + grp * N + offs_n, mask=mask, other=0.0).to(tl.float32)
    else:
        zero = scale  # unused
    return scale, zero


@triton.jit
def dequantize_words(words, scale, zero, BITS: tl.constexpr, ZERO: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_K, BLOCK_N / PER_WORD] -> fp32 weights [BLOCK_K, BLOCK_N] in column order."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    if BITS == 8:
        # signed bytes: b ^ 0x80 is b + 128 as an unsigned byte
        value = ((q ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0)
    elif ZERO:
        value = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        value = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8
    if ZERO:
        return value * scale[None, :] + zero[None, :]
    return value * scale[None, :]


@triton.jit
def add_group_products(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_ptr, thr, k0, k_stop, words_at,
                       row_words, w_mask, scale_ptr, zero_ptr, N, columns, PER_CHANNEL: tl.constexpr,
                       BITS: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                       X_CACHE: tl.constexpr, norm_ptr, rs, NORM: tl.constexpr):
    """One token, one group: the kept rows among the GROUP rows from k0 (a group's first row; rows from k_stop on are
    out of range) times x, added to the per-field accumulators [ROWS, words] (add_slab_products) in slabs of ROWS
    rows. thr: the threshold, or with PER_CHANNEL a pointer to the rows' thresholds (indexed by row); words_at: the
    strip's int32 words of row 0, [1, words] pointers, a row row_words further on; w_mask: the strip's words in range;
    columns: field_scales'. The group's scales are loaded once, only if one of its rows is kept; a skipped row's words
    are not loaded. X_CACHE, norm_ptr, rs, NORM: load_inputs' (NORM: x_ptr is the residual stream, normalised here).
    The per-layer kernel's predicated tiles and the persistent kernel's GEMV tiles (persistent.py) both take their
    one-token groups here."""
    offs_k = k0 + tl.arange(0, GROUP)
    k_mask = offs_k < k_stop
    if PER_CHANNEL:
        thr_k = tl.load(thr + offs_k, mask=k_mask, other=float("inf"))
    else:
        thr_k = thr
    x = load_inputs(x_ptr, offs_k, k_mask, norm_ptr, rs, NORM, X_CACHE)
    kept = tl.max((tl.abs(x) > thr_k).to(tl.int32))
    # the group's scales, only if one of its rows is kept (a block mask: the interpreter mishandles scalar ones)
    mask = tl.where(w_mask, kept, 0) > 0
    s_0, s_1, s_2, s_3, s_4, s_5, s_6, s_7, z_0, z_1, z_2, z_3, z_4, z_5, z_6, z_7 = group_field_scales(
        scale_ptr, zero_ptr, k0 // GROUP, N, columns, mask, BITS, ZERO)
    x_sum = tl.zeros((ROWS,), dtype=tl.float32)
    for i in tl.static_range(GROUP // ROWS):
        rows = k0 + i * ROWS + tl.arange(0, ROWS)
        r_mask = rows < k_stop
        if PER_CHANNEL:
            thr_r = tl.load(thr + rows, mask=r_mask, other=float("inf"))
        else:
            thr_r = thr
        x = load_inputs(x_ptr, rows, r_mask, norm_ptr, rs, NORM, X_CACHE)
        x = tl.where(tl.abs(x) > thr_r, x, 0.0)  # a kept row's x is not 0: it masks the row's words
        words = tl.load(words_at + rows[:, None] * row_words, mask=(x != 0)[:, None] & w_mask[None, :], other=0)
        x_sum += x
        acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7 = add_slab_products(
            acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, words, x, s_0, s_1, s_2, s_3, s_4, s_5, s_6, s_7,
            BITS)
    return add_offsets(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_sum, z_0, z_1, z_2, z_3, z_4, z_5,
                       z_6, z_7, BITS)


@triton.jit
def field_scales(scale_row, zero_row, columns, mask, FIELD: tl.constexpr, BITS: tl.constexpr, ZERO: tl.constexpr):
    """A group's scale and offset, fp32 [words], for column PER_WORD * word + FIELD (scale_row, zero_row: the
    group's rows of scales and zeros; columns: PER_WORD * word, int64), in the terms of field_weights and add_offsets:
    the field's unsigned code u (a 4-bit q; an 8-bit q + 128) weighs scale * u + offset."""
    scale = tl.load(scale_row + columns + FIELD, mask=mask, other=0.0).to(tl.float32)
    if ZERO:
        offset = tl.load(zero_row + columns + FIELD, mask=mask, other=0.0).to(tl.float32)
    else:
        offset = tl.zeros_like(scale)
    if BITS == 8:
        offset -= 128.0 * scale
    elif not ZERO:
        offset -= 8.0 * scale
    return scale, offset


@triton.jit
def group_field_scales(scale_ptr, zero_ptr, grp, N, columns, mask, BITS: tl.constexpr, ZERO: tl.constexpr):
    """field_scales for the eight fields of a word (at 8 bits four: the last four repeat them, never used)."""
    scale_row = scale_ptr + grp * N
    zero_row = zero_ptr + grp * N
    s_0, z_0 = field_scales(scale_row, zero_row, columns, mask, 0, BITS, ZERO)
    s_1, z_1 = field_scales(scale_row, zero_row, columns, mask, 1, BITS, ZERO)
    s_2, z_2 = field_scales(scale_row, zero_row, columns, mask, 2, BITS, ZERO)
    s_3, z_3 = field_scales(scale_row, zero_row, columns, mask, 3, BITS, ZERO)
    if BITS == 4:
        s_4, z_4 = field_scales(scale_row, zero_row, columns, mask, 4, BITS, ZERO)
        s_5, z_5 = field_scales(scale_row, zero_row, columns, mask, 5, BITS, ZERO)
        s_6, z_6 = field_scales(scale_row, zero_row, columns, mask, 6, BITS, ZERO)
        s_7, z_7 = field_scales(scale_row, zero_row, columns, mask, 7, BITS, ZERO)
    else:
        s_4, s_5, s_6, s_7, z_4, z_5, z_6, z_7 = s_0, s_1, s_2, s_3, z_0, z_1, z_2, z_3
    return s_0, s_1, s_2, s_3, s_4, s_5, s_6, s_7, z_0, z_1, z_2, z_3, z_4, z_5, z_6, z_7


@triton.jit
def field_weights(half, scale, FIELD: tl.constexpr, BITS: tl.constexpr):
    """Field FIELD of words as fp32 weights scaled by 2^shift, the field's place in its 16-bit half: u * scale *
    2^shift. half is the field's half of each word, moved to the low 16 bits and OR-ed with 2^23's bits (add_slab_
    products); one AND isolates the field in the low mantissa bits of 2^23, which read as 2^23 + u * 2^shift, and one
    fma takes 2^23 off and scales in a single rounding (2^23 * scale is exact), giving u * scale * 2^shift exactly
    as fp32 rounds u * scale, times a power of two."""
    SHIFT: tl.constexpr = (FIELD % (16 // BITS)) * BITS
    code = half & (0x4B000000 | (((1 << BITS) - 1) << SHIFT))
    return tl.fma(code.to(tl.float32, bitcast=True), scale[None, :], (scale * -8388608.0)[None, :])


@triton.jit
def add_slab_products(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, words, x, s_0, s_1, s_2, s_3, s_4,
                      s_5, s_6, s_7, BITS: tl.constexpr):
    """acc_f [rows, words] += x [rows] * field f's weights times 2^shift (field_weights) of a slab's int32 words: an
    fma a weight after its dequantization (an AND and an fma). word_columns takes the powers of two off; the
    offsets come in once a group (add_offsets)."""
    if BITS == 8:
        words = words ^ -2139062144  # 0x80808080: every byte + 128, unsigned
    low = words | 0x4B000000
    high = (words >> 16) | 0x4B000000
    acc_0 += x[:, None] * field_weights(low, s_0, 0, BITS)
    acc_1 += x[:, None] * field_weights(low, s_1, 1, BITS)
    if BITS == 4:
        acc_2 += x[:, None] * field_weights(low, s_2, 2, BITS)
        acc_3 += x[:, None] * field_weights(low, s_3, 3, BITS)
        acc_4 += x[:, None] * field_weights(high, s_4, 4, BITS)
        acc_5 += x[:, None] * field_weights(high, s_5, 5, BITS)
        acc_6 += x[:, None] * field_weights(high, s_6, 6, BITS)
        acc_7 += x[:, None] * field_weights(high, s_7, 7, BITS)
    else:
        acc_2 += x[:, None] * field_weights(high, s_2, 2, BITS)
        acc_3 += x[:, None] * field_weights(high, s_3, 3, BITS)
    return acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7


@triton.jit
def add_offsets(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, x_sum, z_0, z_1, z_2, z_3, z_4, z_5, z_6,
                z_7, BITS: tl.constexpr):
    """A group's offsets (zero points, or the -8 / -128 that makes a code signed: field_scales' z_f) times the sum
    of its kept x (x_sum [rows]: each slab row's share), once a group instead of once a weight; times the field's
    2^shift, as add_slab_products' products are."""
    PER_HALF: tl.constexpr = 16 // BITS
    acc_0 += x_sum[:, None] * z_0[None, :]
    acc_1 += (x_sum * (1 << (1 % PER_HALF) * BITS))[:, None] * z_1[None, :]
    acc_2 += (x_sum * (1 << (2 % PER_HALF) * BITS))[:, None] * z_2[None, :]
    acc_3 += (x_sum * (1 << (3 % PER_HALF) * BITS))[:, None] * z_3[None, :]
    acc_4 += (x_sum * (1 << (4 % PER_HALF) * BITS))[:, None] * z_4[None, :]
    acc_5 += (x_sum * (1 << (5 % PER_HALF) * BITS))[:, None] * z_5[None, :]
    acc_6 += (x_sum * (1 << (6 % PER_HALF) * BITS))[:, None] * z_6[None, :]
    acc_7 += (x_sum * (1 << (7 % PER_HALF) * BITS))[:, None] * z_7[None, :]
    return acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7


@triton.jit
def word_columns(acc_0, acc_1, acc_2, acc_3, acc_4, acc_5, acc_6, acc_7, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The per-field sums summed over their rows, the fields' powers of two taken off, and put back in column order
    (column PER_WORD * word + field): [BLOCK_N] fp32."""
    PER_HALF: tl.constexpr = 16 // BITS
    c_0 = tl.sum(acc_0, axis=0)
    c_1 = tl.sum(acc_1, axis=0) * (1.0 / (1 << (1 % PER_HALF) * BITS))
    c_2 = tl.sum(acc_2, axis=0) * (1.0 / (1 << (2 % PER_HALF) * BITS))
    c_3 = tl.sum(acc_3, axis=0) * (1.0 / (1 << (3 % PER_HALF) * BITS))
    if BITS == 8:  # [word, a, b]: field 2a + b
        acc = tl.join(tl.join(c_0, c_2), tl.join(c_1, c_3))
    else:  # [word, a, b, c]: field 4a + 2b + c
        c_4 = tl.sum(acc_4, axis=0)
        c_5 = tl.sum(acc_5, axis=0) * (1.0 / (1 << (5 % PER_HALF) * BITS))
        c_6 = tl.sum(acc_6, axis=0) * (1.0 / (1 << (6 % PER_HALF) * BITS))
        c_7 = tl.sum(acc_7, axis=0) * (1.0 / (1 << (7 % PER_HALF) * BITS))
        acc = tl.join(tl.join(tl.join(c_0, c_4), tl.join(c_2, c_6)), tl.join(tl.join(c_1, c_5), tl.join(c_3, c_7)))
    return tl.reshape(acc, (BLOCK_N,))


@triton.jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr, x_ptr):
    """Several tokens: the tile's product on tensor cores, in the activations' dtype with fp32 accumulation."""
    if DOT_FP32:
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), acc)


def pick_grouped_config(k: int, split_sizes, compact: bool, sms: int, group_size: int, tokens: int = 1,
                        bits: int = 4) -> dict:
    """Tile and K split, by rule. A predicated tile is one group of rows. One token: predicated tiles of 4-bit weights
    in 128-row groups take 512 columns and no software pipelining where every output group (split_sizes entry) is a
    multiple of 512 columns and the grid still gives every SM a program (the fastest tile of the H100 sweep in
    benchmark/RESULTS.md); other one-token tiles 256 columns, so each thread dequantizes 256 weights per group's
    scales it loads while a launch still builds in seconds; compact tiles are 64 kept rows of one group (at most the
    group). Several tokens keep a tile's dequantized weights, the tensor-core operand, at 8192 fp32 values (64
    registers a thread with four warps): 128-row groups take 64-column strips, compact tiles 32 x 128. The K split:
    k_split's."""
    stages = 3
    if tokens == 1 and not compact and bits == 4 and group_size == 128 and all(s % 512 == 0 for s in split_sizes) \
            and sum(s // 512 for s in split_sizes) * k_split(k, split_sizes, 512, sms, group_size) >= sms:
        bn, bk, stages = 512, group_size, 1
    elif tokens == 1:
        bn, bk = 256, (min(64, group_size) if compact else group_size)
    else:
        bn, bk = (128, 32) if compact else (max(8192 // group_size, 64), group_size)
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": k_split(k, split_sizes, bn, sms, group_size), "COMPACT": compact,
            "STAGES": stages, "num_warps": 4}


def k_split(k: int, split_sizes, block_n: int, sms: int, group_size: int) -> int:
    """K splits for strips of block_n columns: doubled until the grid gives every SM about two programs, while each
    split keeps at least two groups."""
    strips = sum(triton.cdiv(s, block_n) for s in split_sizes)
    split = 1
    while strips * split < 2 * sms and split < MAX_SPLIT_K and k // (2 * split) >= 2 * group_size:
        split *= 2
    return split


def grouped_config(device: torch.device, k: int, split_sizes, compact: bool, group_size: int, tokens: int,
                   bits: int) -> dict:
    """The launch's meta-parameters (its SPLIT_K is how many partials reduce=False returns)."""
    if INTERPRET:  # small tiles, and a K split whenever K allows one, so CPU tests reach the reduction
        return {"BLOCK_N": 32, "BLOCK_K": 16 if compact else group_size,
                "SPLIT_K": 2 if k >= 2 * group_size else 1, "COMPACT": compact, "STAGES": 1}
    return pick_grouped_config(k, split_sizes, compact, kernels._sm_count(device), group_size, tokens, bits)


def tile_rows(words: int, block_k: int, warps: int) -> int:
    """One-token slabs' ROWS: the rows a program's threads take at once when each thread loads four consecutive words
    (16 bytes) of a row and the threads of a row cover its `words`."""
    per_row = max(1, min(32 * warps, words // 4))
    return max(1, min(block_k, 32 * warps // per_row))


def workspace_rows(k: int, group_size: int) -> int:
    """The K to reserve kernels.py's workspace for: its row lists (3 K) and, after them, the groups' list starts."""
    return k + triton.cdiv(k, group_size)


def grouped_sparse_gemv_triton(x: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor,
                               zeros: torch.Tensor | None, group_size: int, thresholds: torch.Tensor, split_sizes,
                               compact: bool = False, reduce: bool = True, config: dict | None = None) -> torch.Tensor:
    """Launch the kernel. x: [T<=8, K]; weight_t: uint8 [K, N / 2] (4 bits) or int8 [K, N]; scales, zeros: fp16
    [ceil(K / group_size), N] (zeros None: symmetric); thresholds fp32 [G] or [G, K]. Returns y [T, N] in x's dtype,
    or with reduce=False the split-K partial sums, fp32 [SPLIT_K, T, N]."""
    check_inputs(x, weight_t, thresholds, split_sizes, scales, zeros, group_size)
    kernels.check_launch(x, weight_t, thresholds, scales, None, config)
    t, k = x.shape
    n = scales.shape[1]
    bits = 4 if weight_t.dtype == torch.uint8 else 8
    n0, n1 = (list(split_sizes) + [0, 0])[:2]
    if len(split_sizes) == 1:
        n0, n1 = n, 0
    elif len(split_sizes) == 2:
        n1 = n - n0
    meta = dict(config or grouped_config(x.device, k, split_sizes, compact, group_size, t, bits))
    if not meta["COMPACT"] and meta["BLOCK_K"] != group_size:  # a predicated tile reads one group's scales
        raise ValueError(f"sparse_gemv: the predicated variant takes BLOCK_K = group_size ({group_size}), "
                         f"got BLOCK_K={meta['BLOCK_K']}")
    warps = meta.pop("num_warps", 4)
    block_t = meta.pop("BLOCK_T", 1 if t == 1 else 16)
    if block_t < t:
        raise ValueError(f"sparse_gemv: BLOCK_T={block_t} is fewer than the {t} tokens")
    if config is None and not INTERPRET:
        meta["STAGES"] = int(fit_stages(meta, block_t, bits / 8, x.element_size(), kernels._max_shared(x.device)))
    use_pdl = pdl_launch(x.device)
    partials = torch.empty((meta["SPLIT_K"], t, n), dtype=torch.float32, device=x.device)
    counters, rows = kernels._workspace(x.device, workspace_rows(k, group_size), n)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device) if reduce else partials[0]
    args = (x, weight_t, scales, scales if zeros is None else zeros, thresholds, y, partials, counters, rows,
            t, k, n, n0, n1, x.stride(0), y.stride(0))
    flags = {"BITS": bits, "GROUP": group_size, "ZERO": zeros is not None, "PER_CHANNEL": thresholds.dim() == 2,
             "BLOCK_T": block_t, "DOT_FP32": fp32_products(x.dtype), "USE_PDL": use_pdl,
             "EVEN_N": all(s % meta["BLOCK_N"] == 0 for s in split_sizes), "REDUCE": reduce,
             "LIST_CHUNK": min(MAX_LIST_CHUNK, max(group_size, triton.next_power_of_2(
                 k_range(k, meta["SPLIT_K"], group_size)))) if meta["COMPACT"] else 1}
    flags["ALIGNED"] = all(s % (4 * 32 // bits) == 0 for s in split_sizes) and meta["BLOCK_N"] % (4 * 32 // bits) == 0
    flags["ROWS"] = tile_rows(meta["BLOCK_N"] * bits // 32, meta["BLOCK_K"], warps) if block_t == 1 else 1
    grid = (sum(triton.cdiv(s, meta["BLOCK_N"]) for s in split_sizes), meta["SPLIT_K"])
    _grouped_sparse_gemv_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=1, launch_pdl=use_pdl)
    return y if reduce else partials
