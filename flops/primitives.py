"""The study's cost table, in one place. Every other file in ``flops/`` prices work through these names.

The rules:

    addition, subtraction, negation                      1
    multiplication, division, inverse (1/x)              1
    ReLU, absolute value                                 1
    exponentiation (e^x), logarithm                      10
    sine, cosine, square root                            10
    matmul (m x n) @ (n x p)                             m * p * (2n - 1)
    backpropagation                                      2 x the forward pass

Decisions for what the rules leave open (used identically by the analytic counter and the
dispatch-mode verifier, so the two can agree exactly):

    comparison (max, >, ...)     1  on floating-point values (ReLU = max(0, x) costs 1, so max(a, b) does too)
    select / copy / view / cat   0  (masked_fill, where, gather, embedding lookup, dtype casts: data movement)
    integer and boolean work     0  (positions, label masks, counts: bookkeeping, not floating-point work)
    x^2                          1  (one multiplication)
    1/sqrt(x) (rsqrt)            11 (square root 10, then inverse 1)
    random numbers               0  (dropout masks, multinomial draws)
"""

from __future__ import annotations

ADD = SUB = NEG = 1
MUL = DIV = INV = 1
RELU = ABS = 1
CMP = 1          # a comparison of two floats (max/min), priced like ReLU
EXP = LOG = 10
SIN = COS = SQRT = 10
RSQRT = SQRT + INV                          # 11
SIGMOID = NEG + EXP + ADD + INV             # 1/(1 + e^-z): 13
SILU = SIGMOID + MUL                        # z * sigmoid(z): 14
BACKWARD_FACTOR = 2                         # backward = 2 x forward; a training step = 3 x forward


def matmul(m: int, n: int, p: int) -> int:
    """(m x n) @ (n x p): each of the m*p outputs takes n multiplications and n-1 additions."""
    return m * p * (2 * n - 1)


def reduce_sum(n: int) -> int:
    """Sum of n numbers: n - 1 additions (the same for max: n - 1 comparisons)."""
    return max(n - 1, 0)


def mean(n: int) -> int:
    """Mean of n numbers: n - 1 additions and one division."""
    return reduce_sum(n) + DIV


def softmax(n: int) -> int:
    """softmax over one row of n: m = max(x) (n-1 cmp), x - m (n sub), e^(x-m) (10n), s = sum (n-1 add),
    e / s (n div)  ->  14n - 2."""
    return reduce_sum(n) * CMP + n * SUB + n * EXP + reduce_sum(n) * ADD + n * DIV


def log_softmax(n: int) -> int:
    """log_softmax over one row of n: m = max(x) (n-1), x - m (n), e^(x-m) (10n), s = sum (n-1), log s (10),
    (x - m) - log s (n)  ->  14n + 8."""
    return reduce_sum(n) * CMP + n * SUB + n * EXP + reduce_sum(n) * ADD + LOG + n * SUB


def rms_norm(n: int) -> int:
    """RMSNorm of one row of n, y = g * x / sqrt(mean(x^2) + eps): square (n mul), mean (n), + eps (1),
    sqrt + inverse (11), scale x (n mul), gain g (n mul)  ->  4n + 12."""
    return n * MUL + mean(n) + ADD + RSQRT + n * MUL + n * MUL
