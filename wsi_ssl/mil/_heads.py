"""Order-free MIL heads: mean / max pooling, attention MIL (plain and gated) and DSMIL.

All of them cost O(N) in time and memory in the number of tiles ``N`` (times the per-tile
projection ``D x E``), so bags of 10k-50k tiles run in inference on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsi_ssl.mil._base import (
    MILHead,
    MILOutput,
    _check_int,
    _check_prob,
    attention_scores,
    masked_mean,
    masked_softmax,
    projection,
    register_head,
)

__all__ = ["MeanPool", "MaxPool", "ABMIL", "GatedABMIL", "DSMIL"]


class _ProjectedPool(MILHead):
    """A pooling of the tile features after an optional per-tile ``Linear -> ReLU`` projection
    (mean and max pooling share it)."""

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        self.proj, self.embed_dim = projection(self.in_dim, embed_dim,
                                               _check_prob(owner, "dropout", dropout), owner=owner)
        self._build_classifier()


@register_head("mean")
class MeanPool(_ProjectedPool):
    """Mean of the (optionally projected) tile features: the baseline.

    Cost: O(N * D * E) time, O(N * E) memory.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none).
        embed_dim: per-tile ``Linear -> ReLU`` projection before pooling; ``None`` (default)
            pools the raw features (``embed_dim = in_dim``).
        dropout: dropout after the projection.

    Shape:
        x ``(B, N, D)`` -> embedding ``(B, E)``; attention ``(B, N)`` = ``1 / n`` on real tiles.
    """

    def _pool(self, x, mask, coords):
        h = self.proj(x)
        att = mask.to(h.dtype) / mask.sum(dim=1, keepdim=True).to(h.dtype)
        return masked_mean(h, mask), att


@register_head("max")
class MaxPool(_ProjectedPool):
    """Feature-wise max of the (optionally projected) tile features.

    Cost: O(N * D * E) time, O(N * E) memory. ``attention`` is the share of embedding dimensions
    for which a tile is the maximum (sums to 1 per bag).

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none).
        embed_dim: per-tile ``Linear -> ReLU`` projection; ``None`` pools raw features.
        dropout: dropout after the projection.

    Shape:
        x ``(B, N, D)`` -> embedding ``(B, E)``, attention ``(B, N)``.
    """

    def _pool(self, x, mask, coords):
        h = self.proj(x).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        emb = h.amax(dim=1)  # (B, E)
        with torch.no_grad():  # ties share the dimension equally (keeps order invariance)
            hit = (h == emb.unsqueeze(1)) & mask.unsqueeze(-1)
            share = hit.to(emb.dtype) / hit.sum(dim=1, keepdim=True).to(emb.dtype)
            att = share.sum(dim=-1) / emb.shape[1]
        return emb, att


@register_head("abmil")
class ABMIL(MILHead):
    """Attention-based MIL pooling (Ilse, Tomczak & Welling, ICML 2018).

    ``h_i = ReLU(W x_i)``, ``a_i = softmax_i(w^T tanh(V h_i))``, embedding ``sum_i a_i h_i``.
    Cost: O(N * (D * E + E * A)) time, O(N * E) memory: linear in ``N``
    (a 10k-tile bag takes ~0.2 s on a CPU).

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none).
        embed_dim: size ``E`` of the per-tile projection and of the embedding (default 512).
        attn_dim: hidden size ``A`` of the attention network (default 128).
        dropout: dropout after the projection and in the attention network.

    Shape:
        x ``(B, N, D)`` -> embedding ``(B, E)``, attention ``(B, N)`` (softmax weights).
    """

    gated: bool = False
    pools_with_attention = True

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int = 512,
                 attn_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        dropout = _check_prob(owner, "dropout", dropout)
        self.proj, self.embed_dim = projection(self.in_dim, embed_dim, dropout, owner=owner)
        attn_dim = _check_int(owner, "attn_dim", attn_dim, 1)
        self.attn_v = nn.Linear(self.embed_dim, attn_dim)
        self.attn_u = nn.Linear(self.embed_dim, attn_dim) if self.gated else None
        self.attn_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attn_w = nn.Linear(attn_dim, 1)
        self._build_classifier()

    def _pool(self, x, mask, coords):
        h = self.proj(x)  # (B, N, E)
        scores = attention_scores(h, self.attn_v, self.attn_w, self.attn_u,
                                  self.attn_drop)  # (B, N)
        att = masked_softmax(scores, mask)
        emb = torch.bmm(att.unsqueeze(1), h).squeeze(1)
        return emb, att


@register_head("gated_abmil")
class GatedABMIL(ABMIL):
    """Gated attention MIL (Ilse et al. 2018): ``a_i ~ w^T (tanh(V h_i) * sigmoid(U h_i))``.

    Same arguments and cost as :class:`ABMIL` (O(N) time and memory).

    Shape:
        x ``(B, N, D)`` -> embedding ``(B, E)``, attention ``(B, N)``.
    """

    gated = True


@register_head("dsmil")
class DSMIL(MILHead):
    """Dual-stream MIL (Li, Li & Eliceiri, CVPR 2021).

    Stream 1 scores every tile with an instance classifier and keeps the max per class (the
    *critical* tile). Stream 2 attends from every tile to the critical tile in a learned query
    space: ``a_i = softmax_i(<q_i, q_crit> / sqrt(Q))`` and pools ``sum_i a_i v_i``. One stream per
    class (one when ``n_classes=0``); the embedding concatenates them. With a classifier, logits
    are the mean of the bag classifier and the max instance score, as in the paper.
    Cost: O(N * (D * E + E * Q)) time, O(N * E) memory.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes (0 = none; one attention stream then, whose instance scorer only
            picks the critical tile and gets no gradient).
        embed_dim: per-tile projection size ``E`` (default 256); ``embed_dim`` of the head is
            ``E * max(n_classes, 1)``.
        query_dim: query size ``Q`` (default 128).
        dropout: dropout after the projection.

    Shape:
        x ``(B, N, D)`` -> embedding ``(B, E * K)``, logits ``(B, C)``, attention ``(B, N)``
        (mean over the K streams).
    """

    pools_with_attention = True

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int = 256,
                 query_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        self.proj, feat_dim = projection(self.in_dim, embed_dim,
                                               _check_prob(owner, "dropout", dropout), owner=owner)
        self.n_streams = max(self.n_classes, 1)
        self.instance_classifier = nn.Linear(feat_dim, self.n_streams)
        self.query = nn.Sequential(nn.Linear(feat_dim, _check_int(owner, "query_dim", query_dim, 1)),
                                   nn.Tanh())
        self.value = nn.Linear(feat_dim, feat_dim)
        self.embed_dim = feat_dim * self.n_streams
        self._build_classifier()

    def _streams(self, x, mask):
        h = self.proj(x)  # (B, N, E)
        inst = self.instance_classifier(h).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        inst_max, crit = inst.max(dim=1)  # (B, K)
        q = self.query(h)  # (B, N, Q)
        q_crit = torch.gather(q, 1, crit.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, K, Q)
        scores = torch.einsum("bnq,bkq->bkn", q, q_crit) / math.sqrt(q.shape[-1])
        att = masked_softmax(scores, mask.unsqueeze(1))  # (B, K, N)
        pooled = torch.bmm(att, self.value(h))  # (B, K, E)
        return pooled.flatten(1), att.mean(dim=1), inst_max

    def _pool(self, x, mask, coords):
        emb, att, _ = self._streams(x, mask)
        return emb, att

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        """Pool a padded batch of bags (see :meth:`MILHead.forward`).

        Shape:
            x ``(B, N, D)``, mask ``(B, N)`` -> embedding ``(B, E * K)``, logits ``(B, C)`` or
            None, attention ``(B, N)``.
        """
        x, mask, coords = self._check_inputs(x, mask, coords)
        emb, att, inst_max = self._streams(x, mask)
        logits = None
        if self.classifier is not None:
            logits = 0.5 * (self.classifier(emb) + inst_max)
        return MILOutput(embedding=emb, logits=logits, attention=att)
