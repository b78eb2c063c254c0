"""Memory-mapped safetensors reading, one tensor at a time.

Owns the file format: header parsing with clear errors for truncated or malformed files, the
dtype table (bf16 through ml_dtypes), and the index of a sharded checkpoint. Nothing here knows
about Gemma. Tensors come back as read-only numpy views of the mapped file, so a tensor costs
memory only when it is copied (cast, transposed or sent to a device).
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped; `get(name)` returns a numpy view."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path} is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise CheckpointError(f"{path} is truncated or not a safetensors file (header length {n})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"missing checkpoint file {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a malformed safetensors header") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + n
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if self._base + end > size:
            raise CheckpointError(
                f"{path} is truncated: its header needs {self._base + end} bytes but the file has {size}"
            )
        self._mm = None
        if size > 0:
            with open(path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._mm = np.frombuffer(self._mmap, dtype=np.uint8)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return int(end) - int(start)

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = np.dtype(DTYPES[e["dtype"]])
        start, end = (int(x) for x in e["data_offsets"])
        shape = tuple(e["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name} has a byte range that does not match its shape")
        return self._mm[self._base + start : self._base + end].view(dtype).reshape(shape)

    def release(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the page cache).

        Reading a tensor maps its pages into the process; without this a streamed pass over a
        62 GB file would end with all of it counted as resident.
        """
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = (int(x) + self._base for x in self.entries[name]["data_offsets"])
        start, end = start + lo, min(end, start + hi) if hi is not None else end  # bytes [lo, hi) of the tensor
        if end <= start:
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        self._mmap.madvise(mmap.MADV_DONTNEED, lo, end - lo)


def checkpoint_files(hf_dir: str) -> list[str]:
    """The safetensors files of an HF directory: the index's shards, or the single file."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
        return [os.path.join(hf_dir, name) for name in files]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{hf_dir} holds neither model.safetensors nor model.safetensors.index.json")


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (used by tools and tests that build checkpoints)."""
    inverse = {np.dtype(v): k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {"dtype": inverse[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
