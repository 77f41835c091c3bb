"""Attention building blocks shared by the slide encoders: ALiBi slopes and 2-D distance biases,
memory-bounded (query-chunked) attention, attention that also returns its log-sum-exp, and the
2-D sine-cosine position embedding of MAE / Prov-GigaPath.

All functions are pure torch; big slides never materialise an ``N x N`` matrix per head at once:
queries are processed in chunks whose score matrix fits in ``chunk_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["alibi_slopes", "alibi_bias", "chunked_sdpa", "attention_with_lse",
           "sincos_2d", "CHUNK_BYTES"]

#: default bound (bytes) on one chunk's attention scores (float32)
CHUNK_BYTES = 256 * 2**20


def alibi_slopes(n_heads: int) -> list[float]:
    """The ALiBi head slopes (Press et al., 2022, "Train Short, Test Long", section 3): for a
    power of two ``n``, the geometric sequence starting at and with ratio ``2^(-8/n)``; otherwise
    the slopes of the nearest lower power of two followed by every other slope of the next one."""
    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    low = 2 ** math.floor(math.log2(n_heads))
    return pow2(low) + pow2(2 * low)[0::2][: n_heads - low]


def alibi_bias(slopes: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
               prefix_q: torch.Tensor, prefix_k: torch.Tensor) -> torch.Tensor:
    """2-D ALiBi bias ``-slope_h * ||p_i - p_j||`` (Euclidean distance in grid units), 0 on rows
    and columns of prefix (class) tokens.

    Shape:
        slopes ``(H,)``; pos_q ``(Q, 2)``; pos_k ``(K, 2)``; prefix_q ``(Q,)`` / prefix_k ``(K,)``
        bool; returns ``(H, Q, K)`` float32.
    """
    # exact differences (no |x|^2 + |y|^2 - 2xy shortcut): grid distances are exact in float32
    d = torch.cdist(pos_q.float().unsqueeze(0), pos_k.float().unsqueeze(0),
                    compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)
    d = d.masked_fill(prefix_q[:, None] | prefix_k[None, :], 0.0)
    return -slopes.float().view(-1, 1, 1) * d


def _rows_per_chunk(heads: int, n_keys: int, batch: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes // max(1, 4 * heads * n_keys * batch)))


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 bias_fn: Callable[[slice], torch.Tensor] | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with ``torch.nn.functional.scaled_dot_product_attention``,
    queries in chunks so that one chunk's scores take at most ``chunk_bytes``.

    Args:
        bias_fn: ``bias_fn(rows)`` returns the additive bias of the query rows ``rows`` (a slice),
            shape ``(H, rows, K)`` or ``(B, H, rows, K)``; ``None``: no bias.

    Shape:
        q ``(B, H, Q, d)``, k / v ``(B, H, K, d)``; returns ``(B, H, Q, d)``.
    """
    B, H, Q, _ = q.shape
    step = _rows_per_chunk(H, k.shape[2], B, chunk_bytes)
    outs = []
    for start in range(0, Q, step):
        rows = slice(start, min(Q, start + step))
        mask = None if bias_fn is None else bias_fn(rows).to(q.dtype)
        outs.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (scale ``1/sqrt(d)``) and the log-sum-exp of each query's scaled scores,
    what flash attention returns and LongNet needs to merge its dilated branches. Scores are
    computed in float32, queries in chunks.

    Shape:
        q ``(B, H, Q, d)``, k / v ``(B, H, K, d)``; returns ``(B, H, Q, d)`` and ``(B, H, Q)``
        float32.
    """
    B, H, Q, d = q.shape
    scale = d ** -0.5
    step = _rows_per_chunk(H, k.shape[2], B, chunk_bytes)
    kt = k.float().transpose(-2, -1)
    vf = v.float()
    outs, lses = [], []
    for start in range(0, Q, step):
        s = torch.matmul(q[:, :, start:start + step].float(), kt) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 2-D sine-cosine position embedding of MAE (``get_2d_sincos_pos_embed``) at grid cell
    ``(row, col)``: the first half of the dimensions encodes the column, the second the row;
    each half is ``[sin(p w), cos(p w)]`` with ``w_m = 10000^(-m / (dim / 4))``. Computed in
    float64, returned as float32 (as the published table is).

    Shape:
        rows / cols ``(N,)`` integer; returns ``(N, dim)``.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def enc(p: torch.Tensor) -> torch.Tensor:
        out = p.to(torch.float64).reshape(-1, 1) * omega.to(p.device).reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([enc(cols), enc(rows)], dim=1).float()
