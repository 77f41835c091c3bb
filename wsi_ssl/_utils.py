"""Small helpers shared by every stage: devices, seeds, progress bars, path expansion.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import random
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "expand_slide_items",
    "resolve_device",
    "seed_everything",
    "progress",
    "expand_slide_paths",
    "sanitize_id",
    "SLIDE_EXTENSIONS",
    "file_fingerprint",
    "atomic_path",
    "atomic_write_bytes",
    "release_free_memory",
]

logger = logging.getLogger("wsi_ssl")

DeviceLike = Literal["auto", "cpu", "cuda"] | str

#: File extensions treated as slides when a directory is given.
SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".jp2", ".ome.tif", ".ome.tiff", ".qptiff",
)


def resolve_device(device: DeviceLike | torch.device = "auto") -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA when :func:`torch.cuda.is_available`, then Apple MPS, else the CPU.
    Asking for CUDA on a machine without it is a :class:`~wsi_ssl.errors.ConfigError`.
    """
    import torch  # lazy: torch takes ~1 s to import; only model code pays it

    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} was asked for but CUDA is not available on this machine; "
            "use device='auto' or 'cpu'."
        )
    return dev


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a fresh numpy Generator for local use."""
    import torch  # lazy: torch takes ~1 s to import; only model code pays it

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None,
             desc: str = "", unit: str = "it", disable: bool | None = None, **kwargs: Any):
    """A tqdm progress bar on stderr; silent when stderr is not a terminal unless
    ``WSI_SSL_PROGRESS=1`` (so logs on clusters stay readable). ``WSI_SSL_PROGRESS=0`` silences it."""
    from tqdm.auto import tqdm  # lazy: tqdm only when a progress bar is shown

    if disable is None:
        env = os.environ.get("WSI_SSL_PROGRESS")
        if env is not None:
            disable = env.strip() in ("0", "false", "no", "")
        else:
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, **kwargs)


def sanitize_id(name: str) -> str:
    """A slide id safe for zarr group names and file names: the file stem with every
    character outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "slide"


def _has_slide_ext(p: Path) -> bool:
    name = p.name.lower()
    return any(name.endswith(ext) for ext in SLIDE_EXTENSIONS)


def expand_slide_paths(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (non-recursive, known slide extensions) and glob patterns into
    a sorted, de-duplicated list of paths. A name that matches nothing is an
    :class:`~wsi_ssl.errors.InputError` naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _has_slide_ext(q))
        elif p.exists():
            found = [p]
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
        else:
            found = []
        if not found:
            raise InputError(
                f"{str(item)!r} matches no slide file; pass existing files, directories or glob "
                f"patterns (directories are searched for {', '.join(SLIDE_EXTENSIONS[:6])}, ...)."
            )
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and modification time of a file (what a rerun compares to decide "unchanged")."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime": float(st.st_mtime)}


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is fsynced and moved onto
    ``path`` with ``os.replace`` (readers never see half a file), on error it is removed.
    ``fsync=False`` for small files that need not survive a power cut (the store lock's info,
    written on every locked write).

    The one home of atomic file writes: :func:`atomic_write_bytes` for bytes in memory, this for
    writers that need a path (``tifffile``, ``write_text``). The temporary name is unique per
    process and call, so concurrent writers of the same file never share it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write a file via a temporary sibling and ``os.replace`` so readers never see half of it
    (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def expand_slide_items(items: list[Any]) -> list[Path]:
    """Slide files of paths/folders/globs; a plain file path that does not exist is kept (it
    becomes that slide's recorded failure) unless nothing given exists at all."""
    out: list[Path] = []
    missing: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists() and not any(ch in str(item) for ch in "*?["):
            missing.append(p)
            out.append(p)
        else:
            out += expand_slide_paths([item])
    if missing and len(missing) == len(out):
        expand_slide_paths([missing[0]])  # raises the "matches no slide file" InputError
    return out


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` as a ctypes function, or ``None`` (not Linux, or not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Give the heap memory that glibc's malloc keeps free back to the OS (``malloc_trim(0)``:
    the free pages of every arena, not only the top of the main heap).

    Why: glibc serves big allocations from their own mappings, but raises that threshold (up to
    32 MiB) after the first one is freed; from then on a slide's decoded regions, tile batches,
    augmented views and activations come from the malloc arenas (one per thread: the slide
    reader, its read threads, the prepare thread, the encoder), and what is freed there stays
    resident. Embedding 20 slides in one process (``benchmarks/bench_embed_memory.py``) held
    0.2 GB in use but 2.5 GB free in the arenas, and RSS grew from 2.1 to 4.0 GB. The embedding
    loop (in-process and on each dask worker) calls this after every slide (a few ms); over 40
    slides peak RSS then stays within 1.12 x of the early slides'.

    Returns:
        whether some memory was returned; always ``False`` without glibc (macOS, musl: nothing
        to do) and with ``WSI_SSL_MALLOC_TUNING=0``.
    """
    if os.environ.get("WSI_SSL_MALLOC_TUNING", "1") == "0":
        return False
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
