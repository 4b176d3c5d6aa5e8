"""Tests for fedsim.clients.side_tuning.quantize: hand-computed codes, packing, byte counts, error
bounds."""

from __future__ import annotations

import pytest
import torch

from fedsim.clients.side_tuning.quantize import (
    dequantize,
    fake_quantize,
    payload_nbytes,
    quantize,
)
from fedsim.errors import ConfigError


def test_quantize_int8_per_token_by_hand() -> None:
    # Row absmax 127 -> scale 127 / 127 = 1 (exact in float16): codes are round-half-even of x.
    x = torch.tensor([[127.0, -63.4, 2.5, 0.0]])
    q = quantize(x, 8)
    assert q.data.dtype == torch.int8
    assert q.data.tolist() == [[127, -63, 2, 0]]  # 2.5 rounds to the even 2
    assert q.scale is not None and q.scale.tolist() == [[1.0]]
    assert dequantize(q).tolist() == [[127.0, -63.0, 2.0, 0.0]]
    assert payload_nbytes(q) == 4 * 1 + 1 * 2  # four int8 codes + one float16 scale


def test_quantize_int4_packs_two_codes_per_byte_by_hand() -> None:
    # absmax 7 -> scale 7 / 7 = 1; codes [7, -3, 1, 0] stored +8 = [15, 5, 9, 8];
    # byte 0 = 15 | 5 << 4 = 95, byte 1 = 9 | 8 << 4 = 137.
    x = torch.tensor([[7.0, -3.4, 0.6, 0.0]])
    q = quantize(x, 4)
    assert q.data.dtype == torch.uint8
    assert q.data.tolist() == [[95, 137]]
    assert dequantize(q).tolist() == [[7.0, -3.0, 1.0, 0.0]]
    assert payload_nbytes(q) == 2 + 2  # two packed bytes + one float16 scale


def test_quantize_int4_odd_width_pads_one_nibble() -> None:
    # [7, 7, 7] -> codes 7 -> nibbles 15; the pad nibble is 0: bytes [15 | 15 << 4, 15] = [255, 15]
    q = quantize(torch.full((1, 3), 7.0), 4)
    assert q.data.tolist() == [[255, 15]]
    assert q.shape == (1, 3)
    assert dequantize(q).tolist() == [[7.0, 7.0, 7.0]]


def test_per_tensor_scale_is_one_number() -> None:
    # absmax over both rows is 254 -> scale 2; row 2's 4.0 -> code 2 (a per-token scale would
    # have given 4 / (4 / 127) = 127).
    x = torch.tensor([[254.0, 0.0], [4.0, -2.0]])
    q = quantize(x, 8, "per_tensor")
    assert q.scale is not None and q.scale.shape == (1, 1) and q.scale.item() == 2.0
    assert q.data.tolist() == [[127, 0], [2, -1]]
    assert payload_nbytes(q) == 4 + 2


@pytest.mark.parametrize(
    ("bits", "dtype", "code_bytes"), [(32, torch.float32, 4), (16, torch.float16, 2)]
)
def test_float_links_have_no_scale(bits: int, dtype: torch.dtype, code_bytes: int) -> None:
    x = torch.tensor([[0.1, -2.0, 3.0]])
    q = quantize(x, bits)
    assert q.scale is None and q.data.dtype == dtype
    assert payload_nbytes(q) == 3 * code_bytes
    assert torch.equal(dequantize(q), x.to(dtype).float())


@pytest.mark.parametrize(
    ("bits", "width", "expected"),
    [
        (16, 384, 384 * 2),  # float16, no scale
        (8, 384, 384 + 2),  # int8 codes + float16 scale
        (4, 384, 192 + 2),  # two codes per byte + scale
        (4, 5, 3 + 2),  # ceil(5 / 2) = 3 bytes
    ],
)
def test_payload_nbytes_per_token(bits: int, width: int, expected: int) -> None:
    q = quantize(torch.randn(6, 10, width), bits)  # 60 token vectors
    assert payload_nbytes(q) == 60 * expected


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_error_within_half_a_step(bits: int) -> None:
    # Round-to-nearest: |x - q * s| <= s / 2 per element, s = absmax / (2**(bits-1) - 1) (+ the
    # float16 rounding of s itself, relative 2**-11, times |code| <= qmax).
    torch.manual_seed(0)
    x = torch.randn(8, 16, 64) * torch.rand(8, 16, 1) * 10
    qmax = 2 ** (bits - 1) - 1
    step = x.abs().amax(dim=-1, keepdim=True) / qmax
    error = (dequantize(quantize(x, bits)) - x).abs()
    assert torch.all(error <= step / 2 + step * qmax * 2**-11 + 1e-6)


def test_zero_rows_survive() -> None:
    x = torch.zeros(2, 4)
    for bits in (8, 4):
        assert torch.equal(dequantize(quantize(x, bits)), x)


def test_fake_quantize_keeps_dtype_and_32_bits_is_identity() -> None:
    x = torch.randn(3, 8)
    assert fake_quantize(x, 32) is x
    assert fake_quantize(x, 8).dtype == torch.float32


@pytest.mark.parametrize(
    ("bits", "scheme", "key"),
    [(6, "per_token", "client.bits"), (8, "per_row", "client.quant_scheme")],
)
def test_bad_quant_config_is_one_line_error(bits: int, scheme: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        quantize(torch.ones(1, 2), bits, scheme)  # type: ignore[arg-type]
