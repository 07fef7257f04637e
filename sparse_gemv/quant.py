"""Group-wise quantized weights in PyTorch: 4-bit packing and dequantization, the layout grouped.py's kernel reads
(and the CPU path multiplies by, dequantized). No Triton here."""
import torch

GROUP_SIZES = (32, 64, 128)


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
