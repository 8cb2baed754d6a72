"""Rows of one on-disk array, one class per format, read ``[start, stop)`` at a time:
numpy arrays and memory maps (.npy, h5py datasets), tensors (.pt), .npz members through
the zip stream, safetensors slices; and shards concatenated along the rows."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np
import torch

_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _shown(path: str) -> str:
    return repr(str(path))


class Array:
    """Rows of an on-disk array: ``shape`` (N, ...) , ``dtype`` (torch), ``name`` (for
    messages); ``read(start, stop, out=None)`` returns rows [start, stop) as a CPU tensor
    (written into ``out`` when given: e.g. a pinned buffer)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    name: str

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._read(start, stop)
        if out is None:
            return rows if rows.is_contiguous() else rows.contiguous()
        out.copy_(rows)
        return out

    def _read(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _torch_dtype(dtype: np.dtype, name: str, arg: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise TypeError(f"Expected `{arg}` to hold numbers, got dtype {dtype} in {name}") from None


class _NumpyArray(Array):
    """A numpy array or memory map (.npy, h5py datasets share the slicing protocol)."""

    def __init__(self, data: Any, name: str, arg: str) -> None:
        self.data, self.name = data, name
        self.shape = tuple(int(s) for s in data.shape)
        self.dtype = _torch_dtype(np.dtype(data.dtype), name, arg)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[start:stop], order="C"))  # a copy: pages read here, not later

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return self._read(start, stop)
        out.numpy()[...] = self.data[start:stop]  # one copy, page cache -> (pinned) buffer
        return out


class _TensorArray(Array):
    def __init__(self, data: torch.Tensor, name: str) -> None:
        self.data, self.name = data.detach(), name
        self.shape, self.dtype = tuple(data.shape), data.dtype

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop].clone()  # pages the rows in on the reading thread


class _NpzMember(Array):
    """A .npz member read through the zip stream: a seek to the first row and a read of
    the rows asked for (stored members seek directly; compressed ones decompress forward,
    which is cheap since chunks are read in order)."""

    def __init__(self, zf: zipfile.ZipFile, member: str, name: str, arg: str) -> None:
        self.zf, self.member, self.name = zf, member, name
        self.stream = zf.open(member)
        version = np.lib.format.read_magic(self.stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(self.stream)
        self.header = self.stream.tell()
        self.np_dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _torch_dtype(self.np_dtype, name, arg)
        self.full = None
        if fortran or self.np_dtype.hasobject:
            self.full = np.load(zf.open(member), allow_pickle=False)  # column-major: rows are not contiguous

    def _read(self, start: int, stop: int) -> torch.Tensor:
        if self.full is not None:
            return torch.from_numpy(np.ascontiguousarray(self.full[start:stop]))
        width = self.row_bytes if self.shape[1:] else self.np_dtype.itemsize
        self.stream.seek(self.header + start * width)
        buf = self.stream.read((stop - start) * width)
        rows = np.frombuffer(buf, dtype=self.np_dtype).reshape((stop - start, *self.shape[1:]))
        return torch.from_numpy(rows.copy())

    def close(self) -> None:
        self.stream.close()


class _SafetensorsArray(Array):
    def __init__(self, handle: Any, key: str, name: str, arg: str) -> None:
        self.slice, self.name = handle.get_slice(key), name
        self.shape = tuple(int(s) for s in self.slice.get_shape())
        dtype = _SAFETENSORS_DTYPES.get(self.slice.get_dtype())
        if dtype is None:
            raise TypeError(f"Expected `{arg}` to hold numbers, got dtype {self.slice.get_dtype()} in {name}")
        self.dtype = dtype

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.slice[start:stop]


class _Concat(Array):
    """Shards concatenated along the rows (every shard has the same trailing shape)."""

    def __init__(self, parts: list[Array], name: str, arg: str) -> None:
        self.parts, self.name = parts, name
        first = parts[0]
        for p in parts[1:]:
            if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
                raise ValueError(
                    f"Expected `{arg}` shards of one trailing shape and dtype, got {first.shape[1:]} {first.dtype} in "
                    f"{first.name} and {p.shape[1:]} {p.dtype} in {p.name}"
                )
        self.offsets = [0]
        for p in parts:
            self.offsets.append(self.offsets[-1] + len(p))
        self.shape = (self.offsets[-1], *first.shape[1:])
        self.dtype = first.dtype

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        for i, part in enumerate(self.parts):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo < hi:
                part.read(lo - self.offsets[i], hi - self.offsets[i], out=out[lo - start : hi - start])
        return out

    def close(self) -> None:
        for p in self.parts:
            p.close()


def _wrap(data: Any, name: str, arg: str) -> Array:
    if isinstance(data, torch.Tensor):
        return _TensorArray(data, name)
    if isinstance(data, np.ndarray):
        return _NumpyArray(data, name, arg)
    raise TypeError(f"Expected `{arg}` to hold an array, got {type(data).__name__} in {name}")
