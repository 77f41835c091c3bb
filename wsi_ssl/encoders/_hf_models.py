"""Loading the weights of a ``transformers`` preset (Phikon, Phikon-v2, Hibou, Midnight) through
``transformers``' own ``from_pretrained``, offline and strictly.

The hub checkpoints of these models were written by transformers 4 (e.g. ViT
``encoder.layer.0.attention.attention.query.weight``, DINOv2's packed SwiGLU
``mlp.weights_in.weight``); transformers 5 names its parameters differently and converts the old
names itself while loading (its ``conversion_mapping``). So we never rename keys by hand: the
file is presented to ``from_pretrained`` in a temporary folder (a symlink named as transformers
expects), with the preset's own config (architecture overrides applied), and every missing,
unexpected or mis-shaped key it reports becomes one :class:`~wsi_ssl.errors.WeightsError`.
``from_pretrained`` builds the model on the meta device and assigns the file's tensors (no double
allocation); safetensors files are memory-mapped, torch files load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from wsi_ssl.encoders._presets import EncoderPreset, _resolve_kwargs, transformers_config
from wsi_ssl.encoders._weights import describe_key_problems, read_weights
from wsi_ssl.errors import WeightsError

__all__ = ["load_transformers_trunk"]

logger = logging.getLogger(__name__)

#: checkpoint keys no preset output uses (ViT's pooler: our rule is CLS)
_IGNORE_UNEXPECTED = ("pooler.",)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bar and no load report from ``from_pretrained`` (we report problems
    ourselves); the previous settings are restored afterwards."""
    from transformers.utils import logging as hf_logging  # lazy: optional extra `transformers`

    bar = hf_logging.is_progress_bar_enabled()
    report = logging.getLogger("transformers.utils.loading_report")
    level = report.level
    hf_logging.disable_progress_bar()
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def _stage(path: Path, folder: Path) -> None:
    """Link ``path`` into ``folder`` under the file name ``from_pretrained`` looks for."""
    name = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
    (folder / name).symlink_to(path.resolve())


def _problems(info: Mapping[str, Any]) -> list[str]:
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or ()
                        if not k.startswith(_IGNORE_UNEXPECTED))
    shapes = sorted(f"{k} {tuple(got)} vs {tuple(want)}"
                    for k, got, want in info.get("mismatched_keys") or ())
    out = describe_key_problems(missing, unexpected, shapes)
    for msg in info.get("error_msgs") or ():
        out.append(str(msg).splitlines()[0][:200])
    return out


def load_transformers_trunk(preset: EncoderPreset, path: Path,
                            overrides: Mapping[str, Any] | None) -> tuple[nn.Module, list[str]]:
    """The preset's ``transformers`` model with the weights of the local file ``path``
    (transformers-4 or transformers-5 parameter names), float32, in eval mode. Checkpoint
    wrappers transformers knows (its ``base_model_prefix``, e.g. ``vit.``) are accepted.

    Returns:
        ``(trunk, problems)``: ``problems`` lists missing / unexpected / mis-shaped keys (empty
        when the file fits exactly; then every parameter holds the file's value).

    Raises:
        WeightsError: the file cannot be read at all.
    """
    model_cls, config, init_kwargs = transformers_config(
        preset, _resolve_kwargs({**preset.kwargs, **(overrides or {})}))
    with tempfile.TemporaryDirectory(prefix="wsi-ssl-hf-") as tmp, _quiet_transformers():
        _stage(path, Path(tmp))
        try:
            trunk, info = model_cls.from_pretrained(
                tmp, config=config, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **init_kwargs)
        except Exception as err:  # noqa: BLE001 - unreadable files fail in many ways
            read_weights(path)  # raises the clear reason (truncated, pickled, ...) if it has one
            first = str(err).splitlines()[0][:200] if str(err) else ""
            raise WeightsError(f"cannot load weights '{path}' into encoder {preset.name!r}: "
                               f"{type(err).__name__}: {first}.") from err
    problems = _problems(info)
    if not problems:
        left = [n for n, t in list(trunk.named_parameters()) + list(trunk.named_buffers())
                if t.is_meta]
        if left:
            problems.append(f"{len(left)} tensors not initialised (e.g. {left[:3]})")
    logger.debug("loaded %s into %s through transformers (%s)", path, preset.name,
                 "; ".join(problems) or "exact")
    return trunk.float().eval(), problems  # float32 for CPU compute; autocast on CUDA
