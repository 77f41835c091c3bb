"""The ``wsi-ssl embed --repair`` command line that re-makes damaged slides.

The store records what was damaged and how it was made (:class:`wsi_ssl.store.RepairPlan`, in
``TileStore.verify().repair`` and in a :class:`~wsi_ssl.errors.RepairSettingsError`); the CLI,
which knows its own options, words it here for ``wsi-ssl info --verify`` and ``wsi-ssl embed
--repair``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wsi_ssl.errors import RepairSettingsError
from wsi_ssl.tiling import EmbedConfig

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store import RepairPlan

__all__ = ["repair_command", "with_repair_command"]

T = TypeVar("T")

#: ``(flag, RepairPlan field, value left out)``, in the order they are printed; ``None`` means
#: always printed (the embed defaults of mpp / tile size depend on the encoder preset); the
#: others are left out when equal to the EmbedConfig default (the ``wsi-ssl embed`` default)
_FLAGS = (("--mpp", "mpp", None), ("--tile-size", "tile_size", None),
          *((f"--{name.replace('_', '-')}", name, EmbedConfig.default(name))
            for name in ("min_tissue", "views", "view_tiles", "seed", "dtype")))


def repair_command(plan: RepairPlan) -> str:
    """``wsi-ssl embed --store STORE --repair --encoder NAME ...`` with the settings recorded in
    ``plan`` (settings equal to the ``wsi-ssl embed`` defaults are left out); for imported
    slides, how to re-import them."""
    if plan.imported:
        return (f"re-import the damaged slides with TileStore({str(plan.store)!r}).import_h5("
                "paths, overwrite=True)")
    args = ["wsi-ssl", "embed", "--store", str(plan.store), "--repair", "--encoder", plan.encoder]
    if plan.weights == "random":
        args.append("--random-weights")
    for flag, name, default in _FLAGS:
        val: Any = getattr(plan, name)
        if val is not None and val != default:
            args += [flag, str(val)]
    if plan.augment is not None and plan.augment != EmbedConfig.default("augment"):
        args += ["--augment", plan.augment]
    if plan.assume_mpp is not None:
        args += ["--assume-mpp", str(plan.assume_mpp)]
    return shlex.join(args) + "   (add --weights FILE if the encoder was built from weights)"


def with_repair_command(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a :class:`~wsi_ssl.errors.RepairSettingsError` it raises comes
    back with the ``wsi-ssl embed --repair`` command that re-makes the slide appended."""
    try:
        return fn(*args, **kwargs)
    except RepairSettingsError as err:
        if err.repair is None:
            raise
        raise RepairSettingsError(f"{err} The command: {repair_command(err.repair)}",
                                  repair=err.repair) from err
