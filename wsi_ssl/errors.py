"""The one error hierarchy of wsi-ssl.

Every error the library raises on purpose is a :class:`WsiSslError`. Each subclass also inherits
the builtin it is closest to (the zarr v3 convention), so ``except OSError`` or ``except
ValueError`` in user code keeps working::

    try:
        slide = open_slide("x.svs")
    except OSError as err:        # catches SlideOpenError too
        ...

Messages name the file, the parameter, the bad value and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "WsiSslError",
    "SlideOpenError",
    "MissingMPPError",
    "ResolutionError",
    "BackendUnavailableError",
    "TissueWarning",
    "RandomWeightsWarning",
    "StoreError",
    "StoreFormatError",
    "StoreLockedError",
    "EncoderMismatchError",
    "WeightsError",
    "InputError",
    "LabelError",
    "ConfigError",
    "RepairSettingsError",
    "NotFittedError",  # noqa: F822 (made on first use, see __getattr__)
    "CheckpointError",
    "ClusterError",
]


class WsiSslError(Exception):
    """Base class of every error raised by wsi-ssl on purpose."""


class SlideOpenError(WsiSslError, OSError):
    """A slide file cannot be opened or read by any backend (not a slide, truncated, corrupt)."""


class MissingMPPError(WsiSslError, ValueError):
    """A slide has no microns-per-pixel in its metadata and none was given (``mpp=`` / ``--assume-mpp``)."""


class ResolutionError(WsiSslError, ValueError):
    """A requested resolution cannot be served (e.g. a target MPP finer than level 0)."""


class BackendUnavailableError(WsiSslError, ImportError):
    """An optional backend or extra is not installed (the message says which ``pip install``)."""


class TissueWarning(UserWarning):
    """Warned (not raised) when a slide has no tissue at the requested settings."""


class RandomWeightsWarning(UserWarning):
    """Warned (once per process per model name) when an encoder without built-in weights is
    built with a random initialisation because no weights were given (``random_weights=True``
    says it is on purpose and silences it)."""


class StoreError(WsiSslError, OSError):
    """A tile store cannot be opened, read or written."""


class StoreFormatError(StoreError, ValueError):
    """A store, group or feature file does not follow the expected format."""


class StoreLockedError(StoreError):
    """Another writer holds the tile store's lock (or this writer lost it to a takeover)."""


class EncoderMismatchError(StoreError, ValueError):
    """Features from a different tile encoder than the one the store/model was built with."""


class WeightsError(WsiSslError, ValueError):
    """Model weights are missing, unreadable or do not match the architecture."""


class InputError(WsiSslError, ValueError):
    """Bad user data: empty bags, wrong shapes or dimensions, NaN/inf values."""


class LabelError(InputError):
    """A label or clinical table is wrong: unknown/missing/duplicated ids, NaN labels, bad times/events."""


class ConfigError(WsiSslError, ValueError):
    """A parameter has an invalid value (the message names it and the allowed range)."""


class RepairSettingsError(ConfigError):
    """``embed_slides(..., repair=True)`` was given settings that would not reproduce a damaged
    slide; ``repair`` holds the settings the slide was made with (a
    :class:`wsi_ssl.store.RepairPlan`, or ``None``)."""

    def __init__(self, message: str, *, repair: object = None) -> None:
        super().__init__(message)
        self.repair = repair


class CheckpointError(WsiSslError, OSError):
    """A training checkpoint cannot be read, or belongs to a different run configuration."""


class ClusterError(WsiSslError, RuntimeError):
    """The batch cluster cannot run the work (jobs die before their worker connects, the dask
    scheduler is lost)."""


def _make_not_fitted_error() -> type:
    from sklearn.exceptions import (
        NotFittedError as SklearnNotFittedError,  # lazy: scikit-learn loads on the first fit, not on import
    )

    class NotFittedError(WsiSslError, SklearnNotFittedError):
        """A learning component was used before ``fit`` (scikit-learn convention).

        Also scikit-learn's ``NotFittedError`` (hence ``ValueError`` and ``AttributeError``), so
        ``sklearn.utils.validation.check_is_fitted`` callers and ``except`` clauses written for
        scikit-learn estimators catch it.
        """

    NotFittedError.__module__ = __name__
    NotFittedError.__qualname__ = "NotFittedError"
    return NotFittedError


def __getattr__(name: str) -> type:
    # NotFittedError subclasses scikit-learn's; it is made on first use so that importing
    # wsi_ssl (and its error hierarchy) does not import scikit-learn (~1.5 s).
    if name == "NotFittedError":
        cls = _make_not_fitted_error()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
