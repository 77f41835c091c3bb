"""Format 2 of one slide group: three sharded zarr v3 arrays, one shard file each.

::

    slides/<slide_id>/
      zarr.json             group attributes ("complete": true last)
      features/zarr.json    (N, D) float16/float32, inner chunks of <= 4 MiB rows
      features/c.0.0        its one shard file
      views/zarr.json       (V, T, D), inner chunk (1, T, D): one bank version per inner chunk
      views/c.0.0.0
      index/zarr.json       int64 (L,): coords (N, 2) at [0, 2N), view_index (V, T) at [P, P + V*T)
      index/c.0

All three are uncompressed (float16 embeddings do not compress: zstd saved under 10% of the bytes
and cost more CPU than the rest of a commit).
Eight files and three folders per slide with a bank (11), fewer without. The logical arrays
(``features``, ``coords``, ``views``, ``view_index``) are what the checksums are computed on.
The size of every shard file is recorded (``shards`` attribute): a missing or truncated shard is
damage, never zeros (zarr itself returns the fill value for a missing or empty shard).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARRAYS", "LOGICAL", "plan_layout", "write_arrays", "shard_problems"]

ARRAYS = ("features", "views", "index")
LOGICAL = ("features", "coords", "views", "view_index")
_KEYS = {"name": "default", "separator": "."}
_KEYS_META = {"name": "default", "configuration": {"separator": "."}}
FEATURE_CHUNK_BYTES = 4 * 1024 * 1024
_INDEX_CHUNK = 65536


def _even_chunks(n: int, target: int) -> int:
    """Rows per inner chunk: at most ``target``, splitting ``n`` into equal pieces (little pad)."""
    if n <= 0:
        return 1
    pieces = math.ceil(n / max(1, target))
    return math.ceil(n / pieces)


def plan_layout(n: int, dim: int, v: int, t: int, itemsize: int) -> dict[str, Any]:
    """Shapes, inner chunks and shards of the three stored arrays of one slide."""
    rows = _even_chunks(n, max(1, FEATURE_CHUNK_BYTES // max(1, dim * itemsize)))
    q = t if v * t else max(1, min(2 * n, _INDEX_CHUNK))
    offset = math.ceil(2 * n / q) * q
    length = offset + v * t
    return {
        "features": {"shape": (n, dim), "chunks": (rows, dim),
                     "shards": (max(1, math.ceil(n / rows)) * rows, dim)},
        "views": {"shape": (v, t, dim), "chunks": (1, max(1, t), dim),
                  "shards": (max(1, v), max(1, t), dim)},
        "index": {"shape": (length,), "chunks": (q,),
                  "shards": (max(1, math.ceil(length / q)) * q,)},
        "view_offset": offset,
    }


def shard_key(name: str, ndim: int) -> str:
    return f"{name}/c." + ".".join("0" * ndim)


def _array_meta(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                shards: tuple[int, ...], attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``zarr.json`` of a sharded, uncompressed array, as zarr-python 3 writes it."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "shape": list(shape), "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shards)}},
        "chunk_key_encoding": _KEYS_META,
        "fill_value": 0.0 if np.dtype(dtype).kind == "f" else 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(chunks), "codecs": [little],
            "index_codecs": [little, {"name": "crc32c"}], "index_location": "end"}}],
        "attributes": dict(attributes or {}), "zarr_format": 3, "node_type": "array",
        "storage_transformers": []}


def group_meta(attributes: Mapping[str, Any]) -> bytes:
    """The ``zarr.json`` of a group with these attributes."""
    return json.dumps({"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"},
                      indent=2).encode()


def write_arrays(group_dir: Path, data: Mapping[str, np.ndarray], plan: Mapping[str, Any],
                 stats: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, int]:
    """Write the three arrays into the folder ``group_dir`` (its ``zarr.json`` is written by the
    caller): the shard files first, then the arrays' ``zarr.json``, with ``stats()`` (called
    last, so it may still be computing meanwhile) as an attribute of ``features``; returns
    ``{shard key: bytes}``.

    The files are written directly (no zarr call: its per-call overhead was most of a commit),
    byte-identical to what ``zarr.create_array(..., shards=...)`` writes (tested)."""
    n = data["features"].shape[0]
    v, t = data["view_index"].shape
    off = plan["view_offset"]
    index = np.zeros(plan["index"]["shape"], np.int64)
    index[:2 * n] = data["coords"].reshape(-1)
    index[off:off + v * t] = data["view_index"].reshape(-1)
    stored = {"features": data["features"], "views": data["views"], "index": index}
    sizes = {}
    for name in ARRAYS:
        p = plan[name]
        (group_dir / name).mkdir(parents=True, exist_ok=True)
        if stored[name].size:
            key = shard_key(name, len(p["shape"]))
            _write_raw_shard(group_dir / key, stored[name], p["chunks"][0], p["shards"][0])
            sizes[key] = os.path.getsize(group_dir / key)
    attrs = {"features": {"stats": dict(stats())} if stats is not None else None,
             "views": None,
             "index": {"coords": [0, 2 * n, [n, 2]], "view_index": [off, off + v * t, [v, t]]}}
    for name in ARRAYS:
        p = plan[name]
        meta = _array_meta(p["shape"], stored[name].dtype, p["chunks"], p["shards"], attrs[name])
        (group_dir / name / "zarr.json").write_bytes(json.dumps(meta, indent=2).encode())
    return sizes


def _write_raw_shard(path: Path, data: np.ndarray, rows: int, padded: int) -> None:
    """One shard of an uncompressed array chunked along its first axis only (the other axes
    whole), written directly: the inner chunks of a C-order array are consecutive byte ranges,
    so the shard is the array's bytes, zero rows up to ``padded``, then the shard index
    (``(offset, nbytes)`` little-endian uint64 per inner chunk, C order) and its CRC32C, as the
    zarr v3 sharding codec (``index_location: end``) reads it."""
    import google_crc32c  # lazy: optional: fast CRC32C when installed

    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    row_bytes = int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize
    chunk_bytes = rows * row_bytes
    n_chunks = padded // rows
    index = np.empty((n_chunks, 2), "<u8")
    index[:, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    index_bytes = index.tobytes()
    crc = np.array([google_crc32c.value(index_bytes)], "<u4").tobytes()
    with open(path, "wb") as fh:
        fh.write(memoryview(data.reshape(-1)).cast("B"))
        pad = (padded - data.shape[0]) * row_bytes
        if pad:
            fh.write(bytes(pad))
        fh.write(index_bytes)
        fh.write(crc)


def shard_problems(slide_dir: Path, shards: Mapping[str, int]) -> list[str]:
    """``"views: shard file missing"``-style problems, from the recorded shard sizes."""
    out = []
    for key, size in shards.items():
        name = key.split("/")[0]
        try:
            have = os.stat(slide_dir / key).st_size
        except FileNotFoundError:
            out.append(f"{name}: shard file {key} missing")
            continue
        except OSError as err:
            out.append(f"{name}: shard file {key} unreadable ({err.strerror or err})")
            continue
        if have != int(size):
            out.append(f"{name}: shard file {key} has {have} bytes, {int(size)} were written "
                       "(truncated or altered)")
    return out


class RawShard:
    """Direct reads of a format-2 array stored as ONE uncompressed shard chunked along its first
    axis only (what :func:`write_arrays` writes): rows are byte ranges of the shard file, read with
    ``os.pread`` (adjacent rows coalesced into one read), no zarr call. The shard index is read
    once and its CRC32C checked; :meth:`open` returns None for any other layout (zarr reads it).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, rows: int,
                 offsets: np.ndarray, nbytes: np.ndarray, tail: bytes) -> None:
        self.path = path
        self.tail = tail  # the shard index + CRC as read when opened, re-checked on each read
        self.shape = shape
        self.dtype = dtype
        self.rows = rows
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.offsets = offsets
        self.nbytes = nbytes

    @classmethod
    def open(cls, array_dir: Path, meta: Mapping[str, Any]) -> RawShard | None:
        """The reader of the array described by ``meta`` (its ``zarr.json``), or None."""
        import google_crc32c  # lazy: optional: fast CRC32C when installed

        try:
            shape = tuple(int(s) for s in meta["shape"])
            grid = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner = tuple(int(s) for s in conf["chunk_shape"])
            little = {"name": "bytes", "configuration": {"endian": "little"}}
            if (codec["name"] != "sharding_indexed" or conf["codecs"] != [little]
                    or conf["index_codecs"] != [little, {"name": "crc32c"}]
                    or conf.get("index_location", "end") != "end"
                    or meta.get("chunk_key_encoding") != _KEYS_META
                    or any(g < s for g, s in zip(grid, shape, strict=True))
                    or inner[1:] != shape[1:] or not shape or 0 in shape):
                return None
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        except (KeyError, TypeError, ValueError):
            return None
        n_chunks = grid[0] // inner[0]
        path = array_dir / ("c." + ".".join("0" * len(shape)))
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            want = 16 * n_chunks + 4
            raw = os.pread(fd, want, size - want) if size >= want else b""
        finally:
            os.close(fd)
        if len(raw) != want or np.frombuffer(raw[-4:], "<u4")[0] != google_crc32c.value(
                raw[:-4]):
            raise ValueError(f"shard index of '{path}' is damaged (checksum mismatch)")
        index = np.frombuffer(raw[:-4], "<u8").reshape(n_chunks, 2)
        chunk_bytes = inner[0] * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if (index[:, 1] != chunk_bytes).any() or (index[:, 0] + index[:, 1] > size - want).any():
            raise ValueError(f"shard index of '{path}' points outside the file or at chunks of "
                             "the wrong size")
        return cls(path, shape, dtype, inner[0], index[:, 0].astype(np.int64),
                   index[:, 1].astype(np.int64), raw)

    def _spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(file offset, bytes) covering rows [start, stop), adjacent pieces merged."""
        spans: list[tuple[int, int]] = []
        r = start
        while r < stop:
            c = r // self.rows
            end = min(stop, (c + 1) * self.rows)
            off = int(self.offsets[c]) + (r - c * self.rows) * self.row_bytes
            n = (end - r) * self.row_bytes
            if spans and spans[-1][0] + spans[-1][1] == off:
                spans[-1] = (spans[-1][0], spans[-1][1] + n)
            else:
                spans.append((off, n))
            r = end
        return spans

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique, in range) along the first axis."""
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        if not len(rows):
            return out
        flat = memoryview(out.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            n = len(self.tail)
            if size < n or os.pread(fd, n, size - n) != self.tail:
                # like zarr, which reads the index with every read: a shard rewritten or damaged
                # since this slide was opened is never read with a stale index
                raise ValueError(f"the shard index of '{self.path}' changed since it was opened "
                                 "(damaged or rewritten)")
            pos = 0
            for a, b in zip(starts, ends, strict=True):
                for off, n in self._spans(int(rows[a]), int(rows[b - 1]) + 1):
                    got = os.preadv(fd, [flat[pos:pos + n]], off)
                    if got != n:
                        raise ValueError(f"'{self.path}' is shorter than its shard index says "
                                         "(truncated)")
                    pos += n
        finally:
            os.close(fd)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, stop, dtype=np.int64))
