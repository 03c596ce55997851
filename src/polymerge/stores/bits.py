"""Bit packing for stores that keep 1-bit pieces (masks, signs): 8 entries to a byte.

Entry ``i`` of a flat boolean tensor goes to bit ``i % 8`` (least significant first) of byte
``i // 8``; the last byte is zero-padded. A packed piece is a ``uint8`` tensor of
``packed_size(n)`` bytes per row; :func:`unpack_bits` needs ``n`` back (the tensor's element
count, which the manifest knows from the tensor's shape). Both run on any device.
"""

from __future__ import annotations

import torch

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_size(n: int) -> int:
    """Bytes holding ``n`` bits."""
    return (int(n) + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension of a boolean tensor, 8 to a byte: (..., n) -> (..., ceil(n/8))."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits takes a boolean tensor, got {bits.dtype}")
    n = bits.shape[-1]
    pad = packed_size(n) * 8 - n
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    groups = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (groups * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The boolean tensor (..., n) that :func:`pack_bits` packed into (..., ceil(n/8))."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits takes a uint8 tensor, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} bits "
                         f"({packed_size(n)} bytes do)")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()
