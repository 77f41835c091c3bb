"""Projection / prediction heads (MLPs) for self-supervised methods."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from wsi_ssl._validation import Interval, SequenceOf, validate_params

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Sequential):
    """An MLP: ``Linear -> BatchNorm1d -> ReLU`` between every pair of ``dims`` except the last
    pair, which is a plain ``Linear`` (SimCLR's projection g(.), BYOL's projector/predictor).

    Args:
        dims: layer widths, input first; at least two, e.g. ``(512, 512, 512, 256)``.
        batch_norm: put ``BatchNorm1d`` in the hidden layers (the hidden ``Linear`` then has no
            bias, as the norm makes it redundant).

    Shape:
        ``(B, dims[0]) -> (B, dims[-1])``.
    """

    def __init__(self, dims: Sequence[int] = (512, 512, 512, 256), batch_norm: bool = True) -> None:
        dims = tuple(dims)
        validate_params("ProjectionHead", {"dims": dims},
                        {"dims": [SequenceOf(Interval(int, 1, None), min_len=2)]},
                        hint="(input, ..., output), e.g. (512, 512, 256).")
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-2], dims[-1]))
        super().__init__(*layers)
        self.dims = dims
        self.in_dim = dims[0]
        self.out_dim = dims[-1]
