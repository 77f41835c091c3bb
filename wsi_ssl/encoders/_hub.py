"""Where a preset's weights are on this machine: a file, a ``--local-dir`` folder, or the local
Hugging Face cache (tile presets and slide presets alike: anything with ``name``, ``hub_repo``,
``weight_files``, ``gated``, ``download_command`` and ``local_dir_name``). Never the network: the cache is searched with ``huggingface_hub``'s own
offline lookup (``try_to_load_from_cache``), and a missing model gives the command that fetches
it on a connected machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wsi_ssl.encoders._presets import EncoderPreset
from wsi_ssl.errors import WeightsError

__all__ = ["hf_cache_dir", "find_in_cache", "resolve_weights", "locate_weights"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment *now* (``HF_HUB_CACHE``,
    ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub, or
    ``~/.cache/huggingface/hub``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def find_in_cache(preset: EncoderPreset) -> Path | None:
    """The cached weight file of ``preset`` (revision ``main``), or ``None``. Offline only."""
    try:
        from huggingface_hub import try_to_load_from_cache  # lazy: hub cache lookups only
    except ImportError:  # pragma: no cover - a dependency of wsi-ssl
        return None
    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    for filename in _preferred(preset.weight_files, _standard(preset)):
        found = try_to_load_from_cache(preset.hub_repo, filename, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _preferred(names: tuple[str, ...], standard: bool = True) -> list[str]:
    """The preset's files plus (``standard``) the two standard hub names, safetensors first (no
    pickle at all), then the others in the preset's order."""
    extra = ("model.safetensors", "pytorch_model.bin") if standard else ()
    names = tuple(dict.fromkeys((*names, *extra)))
    return sorted(names, key=lambda n: not n.endswith(".safetensors"))


def _standard(preset: Any) -> bool:
    """False for presets whose hub repo holds another model under the standard names (e.g.
    Prov-GigaPath's repo: the tile encoder is ``pytorch_model.bin``, the slide encoder
    ``slide_encoder.pth``)."""
    return bool(getattr(preset, "standard_files", True))


def _from_dir(preset: EncoderPreset, folder: Path) -> Path:
    for filename in _preferred(preset.weight_files, _standard(preset)):
        if (folder / filename).is_file():
            return folder / filename
    candidates = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) == 1 and _standard(preset):
        return folder / candidates[0]
    held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise WeightsError(
        f"folder '{folder}' holds no weights of preset {preset.name!r} (looked for "
        f"{', '.join(preset.weight_files)}; it holds {held}). Fetch them on a connected machine "
        f"with `{preset.download_command}` and pass that folder.")


def missing_weights_message(preset: EncoderPreset) -> str:
    gated = (f" (gated: accept the licence at https://huggingface.co/{preset.hub_repo} and run "
             "`huggingface-cli login` first)") if preset.gated else ""
    return (f"no weights for encoder {preset.name!r}: none given and {preset.hub_repo} is not in "
            f"the local Hugging Face cache '{hf_cache_dir()}' (HF_HUB_CACHE / HF_HOME). On a "
            f"machine with internet access run `{preset.download_command}`{gated}, copy the "
            f"folder here and pass weights='{preset.local_dir_name}/' (CLI: --weights "
            f"{preset.local_dir_name}/), or copy that machine's cache folder "
            f"'models--{preset.hub_repo.replace('/', '--')}' into '{hf_cache_dir()}'.")


def resolve_weights(preset: EncoderPreset, weights: str | os.PathLike | None) -> Path:
    """The weight file to load for ``preset``: ``weights`` itself (a file), the matching file in
    ``weights`` (a folder, e.g. written by ``huggingface-cli download --local-dir``), or the
    cached file from the local Hugging Face cache when ``weights`` is ``None``.

    Raises:
        WeightsError: nothing found (the message gives the download command and where to put
            the files).
    """
    if weights is None:
        found = find_in_cache(preset)
        if found is None:
            raise WeightsError(missing_weights_message(preset))
        return found
    path = Path(weights).expanduser()
    if path.is_dir():
        return _from_dir(preset, path)
    if path.is_file():
        return path
    raise WeightsError(f"weights '{path}' for encoder {preset.name!r} do not exist; pass the "
                       f"file or the folder written by `{preset.download_command}`.")


def locate_weights(preset: EncoderPreset, search: tuple[str | os.PathLike, ...] = ()
                   ) -> Path | None:
    """Where this machine has ``preset``'s weights: the Hugging Face cache, or a folder named
    like the repo (e.g. ``UNI/``) under one of ``search``; ``None`` if nowhere."""
    found = find_in_cache(preset)
    if found is not None:
        return found
    for base in search:
        folder = Path(base).expanduser() / preset.local_dir_name
        if folder.is_dir():
            try:
                return _from_dir(preset, folder)
            except WeightsError:
                continue
    return None
