"""Streaming reader and writer of the safetensors format, one tensor at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length, a JSON header mapping each tensor name to
{dtype, shape, data_offsets} (offsets relative to the end of the header),
then the raw little-endian bytes. Reading with ``seek`` + ``readinto`` into
a fresh array (instead of mmap) and writing tensor by tensor keep host
memory bounded by one tensor: mmapped pages would stay in the resident set
for as long as the file is open.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from jaxsql.errors import JaxsqlError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype string ("F32", "BF16", ...) of a numpy dtype."""
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise JaxsqlError(f"dtype {dt} cannot be stored in safetensors")
    return CODES[dt]


class SafetensorsReader:
    """Header of one ``.safetensors`` file and tensor-by-tensor reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file's {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise JaxsqlError(f"{self.path}: not a readable safetensors file ({e})") from None
        self._data_start = 8 + n
        self.header: dict[str, dict[str, Any]] = self._checked(header, size - self._data_start)
        self.metadata = header.get("__metadata__") or {}

    def _checked(self, header: Any, data_bytes: int) -> dict[str, dict[str, Any]]:
        """The tensor entries of `header`, each validated, or one `JaxsqlError` naming what is wrong."""

        def bad(what: str) -> JaxsqlError:
            return JaxsqlError(f"{self.path}: corrupt safetensors header: {what}")

        if not isinstance(header, dict):
            raise bad(f"expected a JSON object, found {type(header).__name__}")
        meta = header.get("__metadata__")
        if meta is not None and not isinstance(meta, dict):
            raise bad("__metadata__ is not an object")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise bad(f"tensor {name!r} needs dtype, shape and data_offsets")
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise bad(f"tensor {name!r} has shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_bytes):
                raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {data_bytes} data bytes")
            if not isinstance(info["dtype"], str):
                raise bad(f"tensor {name!r} has dtype {info['dtype']!r}")
            out[name] = info
        return out

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.header[name]["dtype"]
        if code not in DTYPES:
            raise JaxsqlError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return np.dtype(DTYPES[code])

    def read(self, name: str) -> np.ndarray:
        """A freshly allocated array holding tensor `name`."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        out = np.empty(self.shape(name), self.dtype(name))
        if out.nbytes != end - begin:
            raise JaxsqlError(f"{self.path}: tensor {name} has {end - begin} bytes, expected {out.nbytes}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise JaxsqlError(f"{self.path}: tensor {name} is truncated")
        return out


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, Any, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write tensors (name, dtype, shape) to `path`, asking `produce(name)` for each in turn.

    Only one produced tensor is alive at a time. Returns the bytes of tensor data written.
    """
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            arr = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise JaxsqlError(f"{path}: tensor {name} has shape {arr.shape}, planned {tuple(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
    return offset
