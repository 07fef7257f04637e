"""Group-wise quantized weights in PyTorch: 4-bit packing and dequantization, the layout grouped.py's kernel and the
fused CPU kernel read (and CPU prefill, or CPU decoding where that kernel cannot be built, multiplies by, dequantized a
slab of columns at a time). No Triton here."""
import torch

GROUP_SIZES = (32, 64, 128)
SLAB_BYTES = 1 << 20  # fp32 weights grouped_matmul dequantizes at once: a slab that stays in a core's cache
FEW_TOKENS = 8  # up to this many tokens grouped_matmul scales once a group (decode steps; sparse_gemv's MAX_TOKENS)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[K, N] integers in 0..15 -> uint8 [K, N / 2], columns 2j and 2j + 1 in byte j's low and high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [K, N / 2] -> uint8 [K, N] in 0..15 (pack_int4's inverse)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def out_features(weight_t: torch.Tensor) -> int:
    """Output channels of a group-wise quantized weight [..., K, N / 2] or [..., K, N]: two per byte at 4 bits."""
    return weight_t.shape[-1] * (2 if weight_t.dtype == torch.uint8 else 1)


def dequantize_grouped(weight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [K, N] weight a group-wise quantized one stands for, in dtype (computed in fp32, as the kernel does)."""
    k = weight_t.shape[0]
    groups, n = scales.shape
    q = unpack_int4(weight_t) if weight_t.dtype == torch.uint8 else weight_t
    q = torch.nn.functional.pad(q, (0, 0, 0, groups * group_size - k)).view(groups, group_size, n).float()
    if weight_t.dtype == torch.uint8 and zeros is None:
        q -= 8
    w = q * scales.float()[:, None]
    if zeros is not None:
        w += zeros.float()[:, None]
    return w.view(groups * group_size, n)[:k].to(dtype)


def dequantize_columns(weight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                       columns: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Columns `columns` (int64 [C]) of the [K, N] weight a group-wise quantized one stands for, as rows [C, K] in
    dtype: dequantize_grouped(...)[:, columns].t(), with the same fp32 arithmetic, reading only those columns. A
    quantized embedding table is stored so ([dim, vocab], the LM head's layout): a lookup is this."""
    k = weight_t.shape[0]
    if weight_t.dtype == torch.uint8:  # column c is byte c // 2's low (c even) or high nibble
        q = (weight_t.index_select(1, columns // 2) >> (4 * (columns % 2)).to(torch.uint8)) & 15
        q = q.float() - (8 if zeros is None else 0)
    else:
        q = weight_t.index_select(1, columns).float()
    w = q * scales.index_select(1, columns).float().repeat_interleave(group_size, dim=0)[:k]
    if zeros is not None:
        w += zeros.index_select(1, columns).float().repeat_interleave(group_size, dim=0)[:k]
    return w.t().to(dtype).contiguous()  # rows in memory as an embedding's: what reads them rounds as it would


def grouped_matmul(x: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
    """x [..., K] @ the [K, N] weight a group-wise quantized one stands for, in x's dtype, a slab of columns (about
    SLAB_BYTES of fp32 weights) at a time. The whole weight dequantized at once would be a fresh buffer of 4 or 8 times
    its bytes, written and read back through memory on every call; an LM head's would be most of a small model.
    Up to FEW_TOKENS tokens (decode steps), each group's codes times its slice of x, in fp32, scaled once a group as the
    kernel does (the offsets, zero points or Q4_0's -8, times the sum of x over the group): no pass that scales every
    weight; 4-bit codes stay in their bytes, the low nibbles (even columns) and the high ones (odd) two products. More
    tokens (prefill) multiply by each slab dequantized, one matrix product a slab."""
    k, (groups, n) = weight_t.shape[0], scales.shape
    per_byte = 2 if weight_t.dtype == torch.uint8 else 1
    step = max(8, SLAB_BYTES // (4 * k) // 8 * 8)  # whole bytes of 4-bit columns, whole int32 words of either
    if x.numel() > FEW_TOKENS * k:
        out = []
        for c0 in range(0, n, step):
            columns = slice(c0, c0 + step)
            w = dequantize_grouped(weight_t[:, c0 // per_byte:(c0 + step) // per_byte].contiguous(), scales[:, columns],
                                   None if zeros is None else zeros[:, columns], group_size, x.dtype)
            out.append(x @ w)
        return torch.cat(out, dim=-1)
    rows = x.reshape(-1, k).to(torch.promote_types(x.dtype, torch.float32))
    pad = groups * group_size - k
    x_groups = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
    x_groups = x_groups.view(-1, groups, group_size).transpose(0, 1)  # [groups, T, group_size]
    x_sums = x_groups.sum(-1, keepdim=True)

    def products(codes):  # [K, columns] integer codes -> [groups, T, columns], each group's x times its codes
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad)) if pad else codes
        return torch.bmm(x_groups, codes.to(rows.dtype).view(groups, group_size, -1))

    bits4 = per_byte == 2
    out = []
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        if bits4:
            packed = weight_t[:, c0 // 2:c1 // 2]
            y = torch.stack([products(packed & 15), products(packed >> 4)], dim=-1).view(groups, -1, c1 - c0)
        else:
            y = products(weight_t[:, c0:c1])
        scale = scales[:, None, c0:c1].to(rows.dtype)
        y.mul_(scale)
        if zeros is not None:
            y += x_sums * zeros[:, None, c0:c1].to(rows.dtype)
        elif bits4:
            y -= x_sums * (8 * scale)
        out.append(y.sum(0))
    return torch.cat(out, dim=-1).view(*x.shape[:-1], n).to(x.dtype)
