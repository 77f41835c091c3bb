"""PRISM's slide encoder (Shaikovski et al., 2024, arXiv:2405.10254; hub ``paige-ai/Prism``): the
Perceiver "image resampler" that turns Virchow tile embeddings into a slide embedding. Only the
slide-representation side is built (``image_resampler.*``); the BioGPT text decoder and the
contrastive heads in the same checkpoint are not.

Written from the published ``config.json`` (``perceiver_config``: 512 + 1 latents of width 1280,
context 2560, 8 Perceiver layers whose cross-attention (1 head) is shared from layer 1 on and whose
6-block latent transformer (8 heads) is shared from layer 0 on, GEGLU feed-forwards of
multiplier 1, no LayerNorm on the context). Shared modules appear under every layer's name in
``state_dict()``; a checkpoint that stores them once loads all the same (see ``_model.py``).

Output: ``image_embedding``, the LayerNorm-ed first latent (1280-d). Tile order does not matter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PrismSlideModel"]


class _CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = query_dim // heads
        inner = self.head_dim * heads
        self.x_norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = context.shape
        k, v = self.to_kv(context).reshape(B, N, 2, self.heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        B, Q, _ = x.shape
        q = self.to_q(self.x_norm(x)).reshape(B, Q, self.heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.to_out(a.transpose(1, 2).reshape(B, Q, -1))


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class _MHSA(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class _Perceiver(nn.Module):
    def __init__(self, *, latent_seq: int, latent_dim: int, context_dim: int, mhsa_heads: int,
                 perceiver_depth: int, transformer_depth: int, share_xattn_start_layer: int,
                 share_tf_start_layer: int, xattn_heads: int, mlp_mult: int) -> None:
        super().__init__()
        self.share_xattn = share_xattn_start_layer
        self.latents = nn.Parameter(torch.zeros(latent_seq, latent_dim))

        def xattn() -> nn.ModuleDict:
            return nn.ModuleDict({"xattn": _CrossAttention(latent_dim, context_dim, xattn_heads),
                                  "ff": _FeedForward(latent_dim, mlp_mult)})

        def transformer() -> nn.ModuleList:
            return nn.ModuleList(nn.ModuleDict({"mhsa": _MHSA(latent_dim, mhsa_heads),
                                                "ff": _FeedForward(latent_dim, mlp_mult)})
                                 for _ in range(transformer_depth))

        layers: list[nn.ModuleDict] = []
        for i in range(perceiver_depth):
            layers.append(nn.ModuleDict({
                "xattn": xattn() if i <= share_xattn_start_layer else layers[-1]["xattn"],
                "tf": transformer() if i <= share_tf_start_layer else layers[-1]["tf"]}))
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1).to(context.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
        kv = None
        for i, layer in enumerate(self.layers):
            xa = layer["xattn"]
            if kv is None or i <= self.share_xattn:  # later layers share W_k, W_v: reuse k, v
                kv = xa["xattn"].kv(context)
            x = xa["xattn"](x, kv, attn_mask) + x
            x = xa["ff"](x) + x
            for block in layer["tf"]:
                x = block["mhsa"](x) + x
                x = block["ff"](x) + x
        return x


class _Resampler(nn.Module):
    def __init__(self, **kw: int) -> None:
        super().__init__()
        dim = kw["latent_dim"]
        self.cls_norm = nn.LayerNorm(dim)
        self.img_norm = nn.LayerNorm(dim)
        self.perceiver = _Perceiver(**{**kw, "latent_seq": kw["latent_seq"] + 1})


class PrismSlideModel(nn.Module):
    """PRISM's Perceiver resampler. ``forward(features, mask)`` embeds a batch of slides.

    Args:
        latent_seq, latent_dim, context_dim, mhsa_heads, perceiver_depth, transformer_depth,
        share_xattn_start_layer, share_tf_start_layer, xattn_heads, mlp_mult: the published
            ``perceiver_config`` (512, 1280, 2560, 8, 8, 6, 1, 0, 1, 1).

    Shape:
        features ``(B, N, context_dim)`` (slides padded to the longest); mask ``(B, N)`` bool,
        True for real tiles (``None``: all real); returns ``(B, latent_dim)``.
    """

    def __init__(self, *, latent_seq: int = 512, latent_dim: int = 1280, context_dim: int = 2560,
                 mhsa_heads: int = 8, perceiver_depth: int = 8, transformer_depth: int = 6,
                 share_xattn_start_layer: int = 1, share_tf_start_layer: int = 0,
                 xattn_heads: int = 1, mlp_mult: int = 1) -> None:
        super().__init__()
        self.image_resampler = _Resampler(
            latent_seq=latent_seq, latent_dim=latent_dim, context_dim=context_dim,
            mhsa_heads=mhsa_heads, perceiver_depth=perceiver_depth,
            transformer_depth=transformer_depth, share_xattn_start_layer=share_xattn_start_layer,
            share_tf_start_layer=share_tf_start_layer, xattn_heads=xattn_heads,
            mlp_mult=mlp_mult)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.image_resampler.perceiver(features, mask)
        return self.image_resampler.cls_norm(x[:, 0])
