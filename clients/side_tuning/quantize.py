"""Low-bit activation payloads: symmetric absmax quantization, exact byte counts.

MobiLLM sends backbone activations device -> server "with low bit-width quantization" (arXiv
2502.20421, abstract); the scheme and the bit width are OPEN (reference/methods.md section 8).
Our decisions, each a config key of the side-tuning client:

* ``bits = 32``: no quantization (float32 as is); the reference for "co-located" side-tuning.
* ``bits = 16``: IEEE float16 cast, no scale.
* ``bits = 8`` / ``4``: symmetric absmax integers ``q = round(x / s)``, ``s = absmax / qmax``
  with ``qmax = 2**(bits-1) - 1`` (127 / 7; the most negative code is unused, so 0 is exact and
  the range is symmetric). Rounding is torch.round (half to even); stochastic rounding is not
  offered. ``s`` is stored as float16 and the codes are computed with that rounded ``s``, so
  ``dequantize`` is exactly ``q * s``.
* scheme ``per_token``: one scale per vector along the last dim (a token's hidden state);
  ``per_tensor``: one scale for the whole payload.
* 4-bit codes are stored offset by +8 as unsigned nibbles, two per byte along the last dim
  (element ``2k`` in the low nibble, ``2k+1`` in the high one; an odd last dim is padded with one
  zero nibble), so :func:`payload_nbytes` is the honest wire size: ``ceil(d / 2)`` bytes per
  vector plus 2 bytes per scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.errors import ConfigError

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "Scheme",
    "check_quant_config",
    "dequantize",
    "fake_quantize",
    "payload_nbytes",
    "quantize",
]

Scheme = Literal["per_token", "per_tensor"]
SUPPORTED_BITS = (32, 16, 8, 4)
_SCHEMES = ("per_token", "per_tensor")
_NIBBLE_OFFSET = 8  # int4 code c in [-7, 7] is stored as the unsigned nibble c + 8 in [1, 15]
_NIBBLE_MASK = 0x0F
_FLOAT16_MAX = 65504.0  # largest finite float16: a scale beyond it would become inf


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as it travels: codes (``data``), float16 scales, and how to undo them.

    ``data`` is float32 (32 bits), float16 (16), int8 (8) or uint8 with two codes per byte (4),
    shaped like the original except that 4-bit packing halves the last dim (rounded up).
    ``scale`` is float16, broadcastable to the original shape (``(..., 1)`` per token,
    ``(1, ..., 1)`` per tensor), or ``None`` for 32 and 16 bits.
    """

    data: torch.Tensor
    scale: torch.Tensor | None
    bits: int
    last_dim: int  # the original size of the last dim (4-bit packing may have padded it)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized tensor."""
        return (*self.data.shape[:-1], self.last_dim)


def check_quant_config(bits: int, scheme: str) -> None:
    """Raise a one-line ConfigError for an unsupported bit width or scheme."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ConfigError("client.bits", bits, f"must be one of {list(SUPPORTED_BITS)}")
    if scheme not in _SCHEMES:
        raise ConfigError("client.quant_scheme", scheme, f"must be one of {list(_SCHEMES)}")


def _scale(x: torch.Tensor, qmax: int, scheme: str) -> torch.Tensor:
    """float16 absmax scale, (..., 1) per token or (1, ..., 1) per tensor; all-zero -> 1."""
    if scheme == "per_token":
        absmax = x.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = x.abs().amax().reshape((1,) * x.dim())
    scale = (absmax.float() / qmax).clamp(max=_FLOAT16_MAX).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # zeros quantize to 0 anyway


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Int codes in [-7, 7], last dim d -> uint8 (..., ceil(d / 2)), low nibble first."""
    unsigned = (codes + _NIBBLE_OFFSET).to(torch.uint8)
    if unsigned.shape[-1] % 2:
        pad = unsigned.new_zeros((*unsigned.shape[:-1], 1))  # where the codes are (CUDA too)
        unsigned = torch.cat([unsigned, pad], dim=-1)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, last_dim: int) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: int8 codes (..., last_dim)."""
    low = (packed & _NIBBLE_MASK).to(torch.int8) - _NIBBLE_OFFSET
    high = (packed >> 4).to(torch.int8) - _NIBBLE_OFFSET
    codes = torch.stack([low, high], dim=-1).flatten(-2)
    return codes[..., :last_dim]


def quantize(x: torch.Tensor, bits: int, scheme: Scheme = "per_token") -> QuantizedTensor:
    """Quantize float ``x`` (..., d) for the wire; see the module docstring for the format."""
    check_quant_config(bits, scheme)
    last_dim = int(x.shape[-1])
    if bits == 32:
        return QuantizedTensor(x.detach().float().clone(), None, bits, last_dim)
    if bits == 16:
        return QuantizedTensor(x.detach().to(torch.float16), None, bits, last_dim)
    qmax = 2 ** (bits - 1) - 1
    x32 = x.detach().float()
    scale = _scale(x32, qmax, scheme)
    # |x / s| <= qmax up to the float16 rounding of s: the clamp guards int8 against 128.
    codes = (x32 / scale.float()).round_().clamp_(-qmax, qmax).to(torch.int8)
    data = codes if bits == 8 else _pack_nibbles(codes)
    return QuantizedTensor(data, scale, bits, last_dim)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values the receiver reconstructs: ``codes * scale`` (or the float data itself)."""
    if q.bits in (32, 16):
        return q.data.to(dtype)
    codes = q.data if q.bits == 8 else _unpack_nibbles(q.data, q.last_dim)
    assert q.scale is not None  # 8 and 4 bits always carry scales
    return (codes.float() * q.scale.float()).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, scheme: Scheme = "per_token") -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what the server sees of ``x``."""
    if bits == 32:
        return x
    return dequantize(quantize(x, bits, scheme), x.dtype)


def payload_nbytes(q: QuantizedTensor) -> int:
    """Bytes on the wire: the codes plus the float16 scales actually stored."""
    scale_bytes = 0 if q.scale is None else q.scale.numel() * q.scale.element_size()
    return q.data.numel() * q.data.element_size() + scale_bytes
