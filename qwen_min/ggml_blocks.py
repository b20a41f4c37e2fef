"""ggml's tensor storage types, decoded to float32 with numpy (the weights of a GGUF file).

Each quantized type stores a tensor row as consecutive blocks of a fixed number of values. The numpy
structured dtypes below spell out one block, field by field, as ggml lays it out (its ``block_q*``
structs, little-endian, no padding). Every decoder takes blocks [n] and returns their values
[n, elements] in float32, computing in the same order as ggml's reference dequantization (scale
products first, then times the quant, then the min subtracted), so the results are bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK = 32     # values per block of the original quants (Q4_0 ... Q8_0)
QK_K = 256  # values per super-block of the k-quants (Q4_K, Q5_K, Q6_K)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., m] -> 4-bit values [..., 2m]: every low nibble first, then every high one (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(word: np.ndarray, count: int) -> np.ndarray:
    """uint32 [n] -> its low ``count`` bits [n, count], bit j in column j."""
    return (word[:, None] >> np.arange(count, dtype=np.uint32)) & 1


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


# F32, F16, BF16: one value per "block".
F32_BLOCK = np.dtype("<f4")
F16_BLOCK = np.dtype("<f2")
BF16_BLOCK = np.dtype("<u2")  # the top half of a float32's bits


def decode_f32(b: np.ndarray) -> np.ndarray:
    return _f32(b)[:, None]


def decode_f16(b: np.ndarray) -> np.ndarray:
    return _f32(b)[:, None]


def decode_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)[:, None]


# Q8_0: 32 values = d * q, q an int8.
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", QK)])


def decode_q8_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"])[:, None] * _f32(b["qs"])


# Q4_0: 32 values = d * (q - 8), q 4 bits: value j in the low nibble of qs[j], value 16 + j in the high one.
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", QK // 2)])


def decode_q4_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"])[:, None] * (_f32(_nibbles(b["qs"])) - 8)


# Q4_1: as Q4_0 with an offset instead of the centring: d * q + m.
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])


def decode_q4_1(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"])[:, None] * _f32(_nibbles(b["qs"])) + _f32(b["m"])[:, None]


# Q5_0: 32 values = d * (q - 16), q 5 bits: the low four as in Q4_0, the fifth of value j is bit j of qh.
Q5_0_BLOCK = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", QK // 2)])


def _q5(b: np.ndarray) -> np.ndarray:
    return _f32(_nibbles(b["qs"]) | (_bits(b["qh"], QK).astype(np.uint8) << 4))


def decode_q5_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"])[:, None] * (_q5(b) - 16)


# Q5_1: as Q5_0 with an offset: d * q + m.
Q5_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", QK // 2)])


def decode_q5_1(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"])[:, None] * _q5(b) + _f32(b["m"])[:, None]


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes [n, 12] -> 8 six-bit scales and 8 six-bit mins, each [n, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scale 4+j (low nibble) and of min 4+j (high nibble).
    """
    lo_sc, lo_m, rest = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (rest & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_m & 63, (rest >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, mn


# Q4_K: 256 values in 8 sub-blocks of 32, value = (d * scale) * q - (dmin * min), q 4 bits. qs holds
# four runs of 32 bytes; run r gives sub-block 2r its low nibbles and sub-block 2r + 1 its high ones.
Q4_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)])


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d * scale) * q - (dmin * min) for q [n, 8, 32] (sub-block, value) -> [n, 256]."""
    sc, mn = _k_scales(b["scales"])
    scale = _f32(b["d"])[:, None] * _f32(sc)
    offset = _f32(b["dmin"])[:, None] * _f32(mn)
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(len(b), QK_K)


def _k_low4(qs: np.ndarray) -> np.ndarray:
    """qs [n, 128] -> 4-bit values [n, 8, 32]: runs of 32 bytes, low nibbles then high ones."""
    runs = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(len(qs), 8, 32)


def decode_q4_k(b: np.ndarray) -> np.ndarray:
    return _k_affine(b, _f32(_k_low4(b["qs"])))


# Q5_K: Q4_K plus a fifth bit per value: bit s of qh[l] belongs to value l of sub-block s.
Q5_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", QK_K // 8),
                       ("qs", "u1", QK_K // 2)])


def decode_q5_k(b: np.ndarray) -> np.ndarray:
    high = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _k_affine(b, _f32(_k_low4(b["qs"]) | (high << 4)))


# Q6_K: 256 values in 16 sub-blocks of 16, value = (d * scale) * (q - 32), q 6 bits, scale an int8.
# Two halves of 128 values; in each, ql's 64 bytes give values 0-63 their low nibbles and 64-127
# their high ones, and qh's 32 bytes hold 2 more bits for each of the four runs of 32 values.
Q6_K_BLOCK = np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
                       ("d", "<f2")])


def decode_q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    low = _nibbles(b["ql"].reshape(n, 2, 64))                                     # [n, 2, 128]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = ((b["qh"].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)      # [n, 2, 128]
    q = (_f32(low | (high << 4)) - 32).reshape(n, QK_K // 16, 16)
    scale = _f32(b["d"])[:, None] * _f32(b["scales"])                             # [n, 16]
    return (scale[:, :, None] * q).reshape(n, QK_K)


@dataclass(frozen=True)
class BlockFormat:
    """A ggml storage type: how many values a block holds, its bytes, and its decoder."""

    elements: int
    layout: np.dtype
    decode: Callable[[np.ndarray], np.ndarray]


# Keyed by ggml's type name (gguf.GGMLQuantizationType); a type missing here is refused by name.
FORMATS: dict[str, BlockFormat] = {
    "F32": BlockFormat(1, F32_BLOCK, decode_f32),
    "F16": BlockFormat(1, F16_BLOCK, decode_f16),
    "BF16": BlockFormat(1, BF16_BLOCK, decode_bf16),
    "Q8_0": BlockFormat(QK, Q8_0_BLOCK, decode_q8_0),
    "Q4_0": BlockFormat(QK, Q4_0_BLOCK, decode_q4_0),
    "Q4_1": BlockFormat(QK, Q4_1_BLOCK, decode_q4_1),
    "Q5_0": BlockFormat(QK, Q5_0_BLOCK, decode_q5_0),
    "Q5_1": BlockFormat(QK, Q5_1_BLOCK, decode_q5_1),
    "Q4_K": BlockFormat(QK_K, Q4_K_BLOCK, decode_q4_k),
    "Q5_K": BlockFormat(QK_K, Q5_K_BLOCK, decode_q5_k),
    "Q6_K": BlockFormat(QK_K, Q6_K_BLOCK, decode_q6_k),
}


def dequantize(raw: bytes | np.ndarray, type_name: str) -> np.ndarray:
    """The float32 values stored in ``raw`` (whole blocks of ggml type ``type_name``), flat."""
    fmt = FORMATS[type_name]
    blocks = np.frombuffer(raw, dtype=fmt.layout)
    return fmt.decode(blocks).reshape(-1)
