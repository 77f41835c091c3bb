"""wsi_ssl.mil: permutation-invariant MIL heads (one contract) and a supervised MIL classifier.

Every head maps a padded batch of bags ``x`` ``(B, N, D)`` (``mask`` ``(B, N)`` True = real tile,
optional ``coords`` ``(B, N, 2)`` in grid units) to a :class:`MILOutput` (``embedding`` ``(B, E)``,
``logits`` ``(B, C)`` or None, ``attention`` ``(B, N)`` or None)::

    from wsi_ssl.mil import create_head, list_heads, MILClassifier
    head = create_head("abmil", in_dim=768, n_classes=0, embed_dim=512)
    clf = MILClassifier(head="gated_abmil").fit(bags, y)
"""

from wsi_ssl.mil._base import (
    ATTENTION_HEADS,
    MILHead,
    MILOutput,
    create_head,
    list_heads,
    register_head,
    require_attention,
)
from wsi_ssl.mil._classifier import MILClassifier
from wsi_ssl.mil._coords import grid_stride, to_grid_units
from wsi_ssl.mil._heads import ABMIL, DSMIL, GatedABMIL, MaxPool, MeanPool
from wsi_ssl.mil._resmlp import ResidualMLPMean
from wsi_ssl.mil._sparseconv import SparseConv2d, SparseConvMIL, SparseGrid
from wsi_ssl.mil._transmil import PPEG, NystromAttention, TransMIL

__all__ = [
    "MILOutput",
    "MILHead",
    "create_head",
    "list_heads",
    "register_head",
    "ATTENTION_HEADS",
    "require_attention",
    "MeanPool",
    "MaxPool",
    "ABMIL",
    "GatedABMIL",
    "DSMIL",
    "ResidualMLPMean",
    "TransMIL",
    "NystromAttention",
    "PPEG",
    "SparseConvMIL",
    "SparseConv2d",
    "SparseGrid",
    "MILClassifier",
    "grid_stride",
    "to_grid_units",
]
