"""Building a foundation-model preset with its weights, without allocating it twice.

The architecture is built on the ``meta`` device (no memory, no initialisation: seconds even for
a ViT-g), the weights file is read (memory-mapped for torch zip files), checked against the
architecture key by key, and the tensors are *assigned* as the parameters
(``load_state_dict(assign=True)``). A mismatch gives one error naming the file, the preset, the
first offending keys and, when the file matches another preset exactly, which one it is.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_ssl.encoders._hf_models import load_transformers_trunk
from wsi_ssl.encoders._presets import (
    _PRESETS,
    EncoderPreset,
    PresetModel,
    build_trunk,
    get_preset,
    is_builtin,
)
from wsi_ssl.encoders._weights import match_state_dict, read_weights
from wsi_ssl.errors import WeightsError

__all__ = ["build_preset_model", "expected_shapes", "identify_weights", "activation_bytes",
           "assign_state_dict", "misfit_error"]

logger = logging.getLogger(__name__)

#: keys some checkpoints carry that no inference model uses (DINOv2 training's mask token)
_IGNORE_TIMM = ("mask_token",)
#: the pooler of a transformers ViTModel (unused by the CLS rule)
_IGNORE_HF = ("pooler.",)
#: wrappers some checkpoints are saved under
_HF_PREFIXES = ("vit.", "dinov2.", "model.")


def _meta_trunk(preset: EncoderPreset, overrides: Mapping[str, Any] | None) -> nn.Module:
    with torch.device("meta"):
        return build_trunk(preset, overrides)


@functools.lru_cache(maxsize=64)
def _expected_shapes_cached(name: str, overrides: tuple[tuple[str, Any], ...]
                            ) -> dict[str, tuple[int, ...]]:
    preset = get_preset(name)
    trunk = _meta_trunk(preset, dict(overrides))
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def expected_shapes(preset: EncoderPreset, overrides: Mapping[str, Any] | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict a checkpoint of ``preset`` must hold (meta build)."""
    if not is_builtin(preset):
        return {k: tuple(v.shape) for k, v in _meta_trunk(preset, overrides).state_dict().items()}
    return dict(_expected_shapes_cached(preset.name, tuple(sorted((overrides or {}).items()))))


def _ignore(preset: EncoderPreset) -> tuple[str, ...]:
    return _IGNORE_TIMM if preset.family in ("timm", "conch") else _IGNORE_HF


def _strip_hf(sd: dict[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        k = key
        for p in _HF_PREFIXES:
            if k not in own and k.startswith(p) and k[len(p):] in own:
                k = k[len(p):]
        out[k] = value
    return out


def identify_weights(sd: Mapping[str, torch.Tensor], *, exclude: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> str | None:
    """The name of the preset whose architecture (with ``overrides``, e.g. a reduced depth)
    ``sd`` matches exactly (keys and shapes), ``None`` if none does. Cheap: meta builds,
    cached."""
    for preset in _PRESETS:
        if preset.name == exclude:
            continue
        try:
            own = expected_shapes(preset, overrides)
        except (ImportError, TypeError, ValueError):  # an optional family that is not installed
            continue
        src = _strip_hf(dict(sd), own) if preset.family == "transformers" else dict(sd)
        _, problems = match_state_dict({k: _Shape(v.shape) for k, v in src.items()}, own,
                                       ignore=_ignore(preset))
        if not problems:
            return preset.name
    return None


class _Shape:
    """A stand-in with a ``shape`` (matching keys without touching tensor data)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)


def build_preset_model(preset: EncoderPreset, path: str | os.PathLike | None, *,
                       overrides: Mapping[str, Any] | None = None, seed: int = 0
                       ) -> PresetModel:
    """The preset's model with the weights of ``path`` (``None``: deterministic random init,
    for tests and architecture checks only).

    Raises:
        WeightsError: the file cannot be read or does not match the architecture.
    """
    if path is None:
        trunk = _random_trunk(preset, overrides, seed)
        return PresetModel(trunk, family=preset.family, output=preset.output).eval()
    path = Path(path)
    if preset.family == "transformers":  # transformers converts hub (v4) key names itself
        trunk, problems = load_transformers_trunk(preset, path, overrides)
        if problems:
            _raise_misfit(preset, path, problems, read_weights(path), overrides)
        return PresetModel(trunk, family=preset.family, output=preset.output).eval()
    raw = read_weights(path)
    trunk = _meta_trunk(preset, overrides)
    own = trunk.state_dict()
    sd, problems = match_state_dict(raw, own, ignore=_ignore(preset))
    if problems:
        _raise_misfit(preset, path, problems, raw, overrides)
    del raw
    assign_state_dict(trunk, sd, path=path, name=preset.name)
    return PresetModel(trunk, family=preset.family, output=preset.output).eval()


def assign_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], *, path: Path,
                      name: str, kind: str = "encoder") -> None:
    """Assign the (matched) tensors of ``sd`` as the parameters of a meta-device ``module``
    (float32 for CPU compute; autocast on CUDA), strictly; any tensor left on the meta device is
    an error."""
    sd = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
          for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta]
    if left:  # non-persistent buffers are not in any file
        raise WeightsError(f"{kind} {name!r}: {left[:3]} were not initialised by "
                           f"'{path}'; this architecture cannot be loaded lazily.")
    logger.debug("loaded %d tensors from %s into %s", len(sd), path, name)


def _raise_misfit(preset: EncoderPreset, path: Path, problems: list[str],
                  raw: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None) -> None:
    """Raise the one error for a weights file that does not fit ``preset``."""
    other = identify_weights(raw, exclude=preset.name, overrides=overrides)
    raise misfit_error(path=path, name=preset.name, problems=problems, other=other,
                       expected=f"{preset.hub_repo}'s {' or '.join(preset.weight_files)}",
                       overrides=overrides)


def misfit_error(*, path: Path, name: str, problems: list[str], other: str | None,
                 expected: str, overrides: Mapping[str, Any] | None, kind: str = "encoder",
                 factory: str = "create_encoder", flag: str = "--encoder") -> WeightsError:
    """The one-line error for a weights file that does not fit the preset ``name``: the
    problems (first offending keys), and the likely cause: the preset ``other`` whose
    architecture the file matches, or the file it should be (``expected``)."""
    cause = (f"this looks like {other!r} weights, not {name!r}: use "
             f"{factory}({other!r}, ...) / {flag} {other}" if other else
             f"check that the file is {expected}")
    if overrides:
        cause += f" (architecture overrides in use: {dict(overrides)})"
    return WeightsError(f"weights '{path}' do not fit {kind} {name!r}: "
                        + "; ".join(problems) + f". Likely cause: {cause}.")


def _random_trunk(preset: EncoderPreset, overrides: Mapping[str, Any] | None, seed: int
                  ) -> nn.Module:
    """A deterministic random instance, fast even for a ViT-g: built on the meta device, then
    matrices and tokens drawn from N(0, 0.02), biases 0, norm/layer-scale weights 1 (not the
    architecture's own initialisation, which takes minutes on a CPU; for tests only)."""
    trunk = _meta_trunk(preset, overrides)
    if any(True for _ in trunk.buffers()):  # buffers are not drawn: use the real init
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_trunk(preset, overrides)
    trunk = trunk.to_empty(device="cpu")
    return init_random_(trunk, seed)


def init_random_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights in place, drawn in key order: matrices N(0, 0.02), biases
    0, norm weights 1 (tests and architecture checks of presets); returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            if t.ndim >= 2:
                t.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.fill_(1.0)
    return module


def activation_bytes(model: PresetModel, input_size: int) -> int:
    """Rough peak activation memory (bytes) per tile of one transformer block at inference:
    token states, the MLP hidden layer and one attention matrix, float32."""
    trunk = model.trunk
    cfg = getattr(trunk, "config", None)
    if cfg is not None:  # transformers
        dim, heads, patch = cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size
        hidden = getattr(cfg, "intermediate_size", None) or int(dim * getattr(cfg, "mlp_ratio", 4))
    else:
        dim = int(getattr(trunk, "embed_dim", 768))
        block = trunk.blocks[0]
        heads = int(getattr(block.attn, "num_heads", 12))
        hidden = int(getattr(getattr(block.mlp, "fc1", None), "out_features", 4 * dim))
        patch = int(trunk.patch_embed.patch_size[0])
    tokens = (input_size // int(patch)) ** 2 + model.num_prefix_tokens
    return 4 * (tokens * (6 * dim + 2 * hidden) + heads * tokens * tokens)
