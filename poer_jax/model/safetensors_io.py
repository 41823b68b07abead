"""Minimal, memory-mapped safetensors reader and streaming writer.

Our own because we need (a) bfloat16 as numpy arrays (ml_dtypes) without torch, (b) lazy slices of
memory-mapped tensors so a shard of a weight is read straight into its device buffer, and (c) a writer
that streams one tensor at a time, so exporting never holds the whole model in host memory.
Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class WeightFileError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and tensor."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: ``get(name)`` returns a read-only np.memmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: no such weight file")
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{self.path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise WeightFileError(f"{self.path}: not a safetensors file (its header is not a JSON object)")
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        try:
            data_len = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise WeightFileError(f"{self.path}: corrupt safetensors header ({e!r})") from e
        size = self.path.stat().st_size
        if size < self._data_start + data_len:
            # np.memmap would fail later with "mmap length is greater than file size", naming nothing
            raise WeightFileError(
                f"{self.path}: truncated: its header describes {self._data_start + data_len} bytes, the file has "
                f"{size} (an interrupted download or copy?)")

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        try:
            return self.header[name]
        except KeyError:
            raise WeightFileError(f"{self.path}: missing tensor {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        e = self._entry(name)
        if e["dtype"] not in _DTYPES:
            raise WeightFileError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
        start, end = e["data_offsets"]
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise WeightFileError(f"{self.path}: tensor {name!r} has a corrupt size in its header")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)


class SafetensorsCheckpoint:
    """A model directory's weights: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``."""

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        if not d.is_dir():
            raise WeightFileError(f"{d}: model directory does not exist")
        index = d / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise WeightFileError(f"{index}: unreadable index ({e})") from e
            self.source = str(index)
            for name, fname in weight_map.items():
                self._where[name] = fname
        elif (d / "model.safetensors").is_file():
            self.source = str(d / "model.safetensors")
            f = SafetensorsFile(d / "model.safetensors")
            self._files["model.safetensors"] = f
            self._where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise WeightFileError(f"{d}: no model.safetensors or model.safetensors.index.json")
        self.dir = d

    def files(self) -> list[SafetensorsFile]:
        """Every weight file, opened (headers read and sizes checked, no tensor data read)."""
        return [self._file(f) for f in sorted(set(self._where.values()))]

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return str(self.dir / self._where[name]) if name in self._where else self.source

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise WeightFileError(f"{self.source}: missing tensor {name!r}")
        return self._file(self._where[name]).get(name)


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[], Iterator[tuple[str, np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream tensors into ``path``: ``tensors`` declares (name, shape, dtype) in write order; ``produce``
    then yields the arrays in that same order, one at a time. Written to a temp file, then renamed."""
    specs = list(tensors)
    header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        expected = iter(specs)
        for name, arr in produce():
            spec = next(expected)
            if spec[0] != name or tuple(arr.shape) != tuple(spec[1]) or arr.dtype != np.dtype(spec[2]):
                raise RuntimeError(f"write_safetensors: got {name} {arr.shape} {arr.dtype}, declared {spec}")
            f.write(np.ascontiguousarray(arr).tobytes())
    tmp.replace(path)
