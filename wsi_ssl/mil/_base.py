"""The one contract every MIL head follows, its output dataclass and the head registry.

A *bag* is the set of tile embeddings of one slide. Every head maps a padded batch of bags to one
vector per bag::

    out = head(x, mask=mask, coords=coords)      # -> MILOutput
    out.embedding   # (B, E), E = head.embed_dim
    out.logits      # (B, C) or None when the head was built with n_classes=0
    out.attention   # (B, N) tile weights (0 on padding) or None

``mask`` is a ``(B, N)`` bool tensor with **True for real tiles and False for padding**; ``None``
means every tile is real. ``coords`` are ``(B, N, 2)`` float tile positions in *grid units*
(level-0 pixels divided by the grid's ``stride_level0``), used by coordinate-aware heads, which
round them to grid cells. Padding is exact (a padded bag gives the output of the unpadded one)
and every head is invariant to the order of the tiles (coords permuted along with the tiles).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wsi_ssl._validation import Interval, Options, validate_params
from wsi_ssl.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

__all__ = ["MILOutput", "MILHead", "create_head", "list_heads", "register_head",
           "ATTENTION_HEADS", "require_attention"]

#: the heads whose attention weights say which tiles matter (``pools_with_attention``)
ATTENTION_HEADS: tuple[str, ...] = ("abmil", "gated_abmil", "dsmil", "transmil",
                                    "sparseconv (pooling='attention')")


@dataclass(frozen=True)
class MILOutput:
    """What every MIL head returns.

    Attributes:
        embedding: the bag (slide) embedding.
        logits: class scores, or ``None`` when the head has no classifier (``n_classes=0``).
        attention: per-tile weights (0 on padding; they sum to 1 over the real tiles of a bag for
            pooling heads), or ``None``.

    Shape:
        embedding ``(B, E)``; logits ``(B, C)``; attention ``(B, N)``.
    """

    embedding: torch.Tensor
    logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ``ConfigError`` in the shared wording
    (``ABMIL(attn_dim=0) must be an integer >= 1.``)."""
    validate_params(owner, {name: value}, {name: [Interval(int, minimum, None)]})
    return int(value)


def _check_prob(owner: str, name: str, value: Any) -> float:
    """A dropout probability in [0, 1), or a ``ConfigError`` in the shared wording."""
    validate_params(owner, {name: value}, {name: [Interval(float, 0, 1, closed="left")]})
    return float(value)


def _check_option(owner: str, name: str, value: Any, options: tuple[str, ...]) -> str:
    """One of ``options``, or a ``ConfigError`` in the shared wording."""
    validate_params(owner, {name: value}, {name: [Options(options)]})
    return str(value)


class MILHead(nn.Module):
    """Base class of the MIL heads: input checks, the optional classifier and common helpers.

    Subclasses implement :meth:`_pool` and set ``self.embed_dim``.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: number of classes of the linear classifier on the embedding; 0 = no classifier
            (``logits=None``, the slide-SSL use).
    """

    #: whether the head uses ``coords`` (and needs them)
    uses_coords: bool = False
    #: whether ``attention`` holds learned pooling weights (which tiles the head looks at); mean
    #: and max pooling report weights too, but they say nothing about what matters
    pools_with_attention: bool = False

    def __init__(self, in_dim: int, n_classes: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_dim = _check_int(owner, "in_dim", in_dim, 1)
        self.n_classes = _check_int(owner, "n_classes", n_classes, 0)
        self.embed_dim: int = self.in_dim
        self.classifier: nn.Module | None = None

    def _build_classifier(self) -> None:
        """Called by subclasses once ``embed_dim`` is known."""
        self.classifier = nn.Linear(self.embed_dim, self.n_classes) if self.n_classes else None

    # -- input checks ---------------------------------------------------------------------------
    def _check_inputs(
        self, x: torch.Tensor, mask: torch.Tensor | None, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"{name}: x must be a (B, N, D) tensor of tile features; got {shape}. "
                "Add a batch axis with x[None] for one bag."
            )
        b, n, d = x.shape
        if d != self.in_dim:
            raise InputError(
                f"{name}: x has feature dim {d} but the head was built with in_dim={self.in_dim}; "
                "build the head with the dimension of your tile encoder."
            )
        if n == 0:
            raise InputError(f"{name}: x has no tiles (N=0); every bag needs at least one tile.")
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        else:
            if tuple(mask.shape) != (b, n):
                raise InputError(
                    f"{name}: mask must have shape (B, N)={(b, n)} like x; got {tuple(mask.shape)}."
                )
            mask = mask.to(device=x.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                empty = torch.nonzero(~mask.any(dim=1)).flatten().tolist()
                raise InputError(
                    f"{name}: bag(s) {empty[:5]} have no real tile (mask all False); "
                    "drop empty bags before calling the head."
                )
        if coords is not None:
            if tuple(coords.shape) != (b, n, 2):
                raise InputError(
                    f"{name}: coords must have shape (B, N, 2)={(b, n, 2)}; got "
                    f"{tuple(coords.shape)}."
                )
            coords = coords.to(x.device)
        elif self.uses_coords:
            raise InputError(
                f"{name} is coordinate-aware and needs coords=(B, N, 2) tile positions in grid "
                "units (level-0 px / stride_level0)."
            )
        # zero the padding so that garbage (even NaN) in padded rows cannot leak into results
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, mask, coords

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        """Pool a padded batch of bags.

        Args:
            x: tile features.
            mask: True for real tiles, False for padding; ``None`` = all real.
            coords: tile positions in grid units (needed by coordinate-aware heads only).

        Shape:
            x ``(B, N, D)``, mask ``(B, N)``, coords ``(B, N, 2)`` -> :class:`MILOutput` with
            embedding ``(B, E)``, logits ``(B, C)`` or None, attention ``(B, N)`` or None.
        """
        x, mask, coords = self._check_inputs(x, mask, coords)
        emb, att = self._pool(x, mask, coords)
        logits = self.classifier(emb) if self.classifier is not None else None
        return MILOutput(embedding=emb, logits=logits, attention=att)

    def _pool(
        self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, embed_dim={self.embed_dim}, n_classes={self.n_classes}"


def require_attention(head: MILHead, owner: str, name: str) -> None:
    """Raise a ``ConfigError`` naming the heads with attention when ``head`` (registered as
    ``name``, inside ``owner``) pools without learned attention weights."""
    if not getattr(head, "pools_with_attention", False):
        raise ConfigError(
            f"{owner} head {str(name).lower().replace('-', '_')!r} has no attention weights "
            f"(it pools without them); heads with attention: {', '.join(ATTENTION_HEADS)}. "
            "Train one of those, or score tiles one by one (MILClassifier.tile_scores, "
            "kind='tile_logit').")


# -- shared building blocks -----------------------------------------------------------------------
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` with padded positions at exactly 0 (mask True = keep)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(B, N, E)`` over the real tiles -> ``(B, E)`` (padding already zero)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def attention_scores(h: torch.Tensor, v: nn.Module, w: nn.Module, u: nn.Module | None = None,
                     dropout: nn.Module | None = None) -> torch.Tensor:
    """Attention-MIL scores (Ilse et al. 2018): ``w^T tanh(V h)``, gated
    ``w^T (tanh(V h) * sigmoid(U h))`` when ``u`` is given. ``(..., E)`` -> ``(...)``."""
    a = torch.tanh(v(h))
    if u is not None:
        a = a * torch.sigmoid(u(h))
    if dropout is not None:
        a = dropout(a)
    return w(a).squeeze(-1)


def projection(in_dim: int, out_dim: int | None, dropout: float, *,
               owner: str = "MILHead") -> tuple[nn.Module, int]:
    """Per-tile ``Linear -> ReLU -> Dropout`` (or the identity when ``out_dim`` is None);
    ``owner`` names the head in messages."""
    if out_dim is None:
        return nn.Identity(), in_dim
    out_dim = _check_int(owner, "embed_dim", out_dim, 1)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers), out_dim


# -- registry -------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., MILHead]] = {}


def register_head(name: str, *, overwrite: bool = False
                  ) -> Callable[[type[MILHead]], type[MILHead]]:
    """Class decorator registering a head under ``name`` for :func:`create_head`.

    Args:
        name: the registry name (lower case, ``_`` between words; ``create_head`` also accepts
            ``-``).
        overwrite: replace an existing registration instead of raising.

    Raises:
        ConfigError: ``name`` is already registered and ``overwrite`` is False.
    """
    key = str(name).lower().replace("-", "_")

    def deco(cls: type[MILHead]) -> type[MILHead]:
        if key in _REGISTRY and _REGISTRY[key] is not cls and not overwrite:
            raise ConfigError(f"a MIL head named {key!r} is already registered "
                              f"({_REGISTRY[key].__name__}); pass overwrite=True to replace it.")
        _REGISTRY[key] = cls
        return cls

    return deco


def list_heads() -> list[str]:
    """Names accepted by :func:`create_head`, sorted."""
    return sorted(_REGISTRY)


def create_head(name: str, in_dim: int, *, n_classes: int = 0, **kwargs: Any) -> MILHead:
    """Build a registered MIL head.

    Args:
        name: one of :func:`list_heads` (``"abmil"``, ``"sparseconv"``, ...).
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier; 0 = no classifier (``logits=None``).
        **kwargs: head-specific options (``embed_dim=``, ``dropout=``, ...).

    Raises:
        ConfigError: unknown name (the message lists the closest matches) or bad options.
    """
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown MIL head {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}."
        )
    try:
        return _REGISTRY[key](in_dim, n_classes=n_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"create_head({name!r}, ...): bad option: {err}") from err
