"""Safetensors files read with plain reads into ordinary memory, one tensor at a time (NumPy only).

`safetensors`' own loaders map the file: the mapped pages count as resident on top of the arrays
made from them (peak memory ~1.6-1.9x the weights at 0.5b), and the kernel may drop mapped weights
under memory pressure and re-read them mid-decode. Reading each tensor into its own array avoids both.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from slimm.errors import CheckpointError

# BF16 has no NumPy dtype: its bits come back as uint16 (torch views them as bfloat16)
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    for key, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in DTYPES or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {key} ({info['dtype']}) is truncated or of an unknown type"
            )
    return header, base


def iter_tensors(path: Path, keys: Iterable[str] | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, safetensors dtype, array) for `keys` (default: every tensor, in file order)."""
    header, base = read_header(path)
    with open(path, "rb") as f:
        for key in header if keys is None else keys:
            info = header[key]
            start, end = info["data_offsets"]
            arr = np.empty(info["shape"], DTYPES[info["dtype"]])
            if arr.nbytes != end - start:
                raise CheckpointError(
                    f"{path}: tensor {key} holds {end - start} bytes, its shape needs {arr.nbytes}"
                )
            f.seek(base + start)
            if arr.nbytes and f.readinto(memoryview(arr.reshape(-1)).cast("B")) != arr.nbytes:
                raise CheckpointError(f"{path}: tensor {key} is truncated")
            yield key, info["dtype"], arr
