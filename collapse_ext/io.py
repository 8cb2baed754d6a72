"""Chunked readers of saved features (``collapse-ext analyze``).

A source is one file, a directory of shards, or a glob of shards, in one of these formats:

=================  ==========================================================
``.npy``           ``np.load(mmap_mode="r")``: rows are paged in as read
``.npz``           members read through the zip stream (no full decompression)
``.pt``            ``torch.load(mmap=True, weights_only=True)``: a tensor or a dict
``.safetensors``   ``safe_open`` + ``get_slice``: only the rows asked for
``.h5``/``.hdf5``  h5py dataset slices (h5py is an optional dependency)
=================  ==========================================================

Shards are read in name order and concatenated along the rows. :func:`open_array` gives an
:class:`Array` (shape, dtype, ``read(start, stop)``); :func:`iter_chunks` reads the same
row range of several arrays in fixed-size chunks on a background thread, one chunk ahead
(into pinned memory, copied with ``non_blocking=True``, for a CUDA device), so memory is
bounded by the chunk size whatever the file size.

Errors are ``ValueError`` / ``TypeError`` whose message names the argument first
("Expected `features_key` to name an array in f.npz, got 'x' (it holds: a, b)").
"""

from __future__ import annotations

import glob as _glob
import os
import pickle
import queue
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMATS",
    "Array",
    "Chunk",
    "iter_chunks",
    "load_tensor",
    "open_array",
    "shard_paths",
]

FORMATS = (".npy", ".npz", ".pt", ".pth", ".safetensors", ".h5", ".hdf5")
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


# ------------------------------------------------------------------------ one file
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


# ---------------------------------------------------------------------- containers
class _Container:
    """An open file: ``keys()`` (None for a single-array file) and ``array(key)``."""

    def __init__(self, path: str, arg: str) -> None:
        self.path, self.arg = path, arg
        self.closers: list[Any] = []
        ext = _ext(path)
        try:
            if ext == ".npy":
                self.single = np.load(path, mmap_mode="r", allow_pickle=False)
                self.items = None
            elif ext == ".npz":
                zf = zipfile.ZipFile(path)
                self.closers.append(zf)
                self.zf = zf
                self.single, self.items = None, {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            elif ext in (".pt", ".pth"):
                obj = _torch_load(path)
                self.single, self.items = (obj, None) if isinstance(obj, torch.Tensor) else (None, _flatten(obj))
            elif ext == ".safetensors":
                from safetensors import safe_open

                self.handle = safe_open(path, framework="pt")
                self.single, self.items = None, {k: k for k in self.handle.keys()}
            elif ext in (".h5", ".hdf5"):
                try:
                    import h5py
                except ImportError:
                    raise ValueError(
                        f"Expected `{arg}` in a format this installation reads, got {_shown(path)} "
                        "(HDF5 needs h5py: pip install h5py)"
                    ) from None
                self.h5 = h5py.File(path, "r")
                self.closers.append(self.h5)
                names: list[str] = []

                def visit(name: str, obj: Any) -> None:  # returning a value would stop the walk
                    if isinstance(obj, h5py.Dataset):
                        names.append(name)

                self.h5.visititems(visit)
                self.single, self.items = None, {n: n for n in names}
            else:
                raise ValueError(
                    f"Expected `{arg}` to end in one of {', '.join(FORMATS)}, got {_shown(path)} (unknown extension)"
                )
        except (OSError, zipfile.BadZipFile, RuntimeError, EOFError, KeyError) as err:
            raise ValueError(_unreadable(arg, path, err)) from None
        except Exception as err:
            ours = isinstance(err, ValueError) and str(err).startswith("Expected `")
            if not ours and (
                isinstance(err, (ValueError, pickle.UnpicklingError)) or "Safetensor" in type(err).__name__
            ):
                raise ValueError(_unreadable(arg, path, err)) from None
            raise

    def keys(self) -> list[str] | None:
        return None if self.items is None else list(self.items)

    def array(self, key: str | None, key_arg: str) -> Array:
        name = os.path.basename(self.path)
        if self.items is None:
            return _wrap(self.single, name, self.arg)
        if key is None or key not in self.items:
            held = ", ".join(self.items) or "no arrays"
            raise ValueError(f"Expected `{key_arg}` to name an array in {name}, got {key!r} (it holds: {held})")
        label = f"{name}:{key}"
        try:
            if hasattr(self, "zf"):
                return _NpzMember(self.zf, self.items[key], label, self.arg)
            if hasattr(self, "handle"):
                return _SafetensorsArray(self.handle, key, label, self.arg)
            if hasattr(self, "h5"):
                return _NumpyArray(self.h5[key], label, self.arg)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            if str(err).startswith("Expected `"):
                raise
            raise ValueError(_unreadable(self.arg, self.path, err)) from None
        return _wrap(self.items[key], label, self.arg)

    def close(self) -> None:
        for c in self.closers:
            c.close()


def _unreadable(arg: str, path: str, err: BaseException) -> str:
    return f"Expected `{arg}` to be a readable {_ext(path)} file, got {_shown(path)} ({_why(err)})"


def _why(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zipfile" not in str(err):
            raise
        # Legacy (non-zip) serialisation cannot be memory-mapped: read it whole.
        return torch.load(path, map_location="cpu", weights_only=True)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Tensors of a (nested) dict/list checkpoint by dotted name ("model.fc.weight")."""
    out: dict[str, Any] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, (torch.Tensor, np.ndarray)):
            out[name] = v
        elif isinstance(v, (dict, list, tuple)):
            out.update(_flatten(v, name + "."))
    return out


def _wrap(data: Any, name: str, arg: str) -> Array:
    if isinstance(data, torch.Tensor):
        return _TensorArray(data, name)
    if isinstance(data, np.ndarray):
        return _NumpyArray(data, name, arg)
    raise TypeError(f"Expected `{arg}` to hold an array, got {type(data).__name__} in {name}")


# ------------------------------------------------------------------------- sources
def shard_paths(source: str | os.PathLike, arg: str = "source") -> list[str]:
    """The files of ``source``: itself, the supported files of a directory, or the matches
    of a glob, in name order; all of one extension."""
    text = os.fspath(source)
    if os.path.isdir(text):
        paths = [os.path.join(text, f) for f in sorted(os.listdir(text)) if _ext(f) in FORMATS]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            kinds = ", ".join(FORMATS)
            raise ValueError(f"Expected `{arg}` directory to hold {kinds} files, got none in {_shown(text)}")
    elif os.path.isfile(text):
        paths = [text]
    elif _glob.has_magic(text):
        paths = sorted(p for p in _glob.glob(text) if os.path.isfile(p))
        if not paths:
            raise ValueError(f"Expected `{arg}` glob to match files, got no match for {_shown(text)}")
    elif os.path.exists(text):
        raise ValueError(f"Expected `{arg}` to be a regular file or a directory, got {_shown(text)}")
    else:
        raise ValueError(f"Expected `{arg}` to be an existing file, directory or glob, got {_shown(text)} (not found)")
    exts = sorted({_ext(p) for p in paths})
    if len(exts) > 1:
        raise ValueError(f"Expected `{arg}` shards of one format, got {', '.join(exts)} in {_shown(text)}")
    if exts[0] not in FORMATS:
        raise ValueError(f"Expected `{arg}` to end in one of {', '.join(FORMATS)}, got {_shown(paths[0])}")
    return paths


class Source:
    """Opened shards of a source; ``array(key)`` is the concatenation of that key over them.
    A context manager (closes the files)."""

    def __init__(self, source: str | os.PathLike, arg: str = "source") -> None:
        self.arg = arg
        self.text = os.fspath(source)
        self.paths = shard_paths(source, arg)
        self.containers: list[_Container] = []
        try:
            for p in self.paths:
                self.containers.append(_Container(p, arg))
        except BaseException:
            self.close()
            raise

    @property
    def single(self) -> bool:
        """True when the files hold one unnamed array each (.npy, a tensor in .pt)."""
        return self.containers[0].keys() is None

    def keys(self) -> list[str]:
        return self.containers[0].keys() or []

    def has(self, key: str) -> bool:
        return not self.single and key in self.keys()

    def array(self, key: str | None = None, key_arg: str = "features_key") -> Array:
        parts = [c.array(key, key_arg) for c in self.containers]
        return parts[0] if len(parts) == 1 else _Concat(parts, f"{self.text}:{key}" if key else self.text, self.arg)

    def close(self) -> None:
        for c in self.containers:
            c.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_array(source: str | os.PathLike, key: str | None = None, *, arg: str = "source") -> Array:
    """One array of a file or shard set (the files stay open while the array is used)."""
    return Source(source, arg).array(key)


def load_tensor(spec: str | os.PathLike, default_keys: Sequence[str], arg: str) -> tuple[torch.Tensor, str]:
    """A small tensor (a classifier weight or bias) from ``FILE[:key]``: the file's only
    array, or ``key``, or the first of ``default_keys`` the file holds. Returns the tensor
    and ``FILE:key`` for messages."""
    text = os.fspath(spec)
    path, key = text, None
    if not os.path.exists(text) and ":" in text:
        path, key = text.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ValueError(f"Expected `{arg}` to be an existing file (FILE[:key]), got {_shown(text)} (not found)")
    container = _Container(path, arg)
    try:
        keys = container.keys()
        if keys is None and key is not None:
            raise ValueError(
                f"Expected `{arg}` without :key for {os.path.basename(path)}, which holds one array, got {key!r}"
            )
        if keys is not None and key is None:
            key = next((k for k in default_keys if k in keys), None)
            if key is None and len(keys) == 1:
                key = keys[0]
            if key is None:
                raise ValueError(
                    f"Expected `{arg}` as FILE:key naming an array of {os.path.basename(path)}, got {_shown(text)} "
                    f"(it holds: {', '.join(keys) or 'no arrays'})"
                )
        array = container.array(key if keys is not None else None, arg)
        tensor = array.read(0, len(array)) if array.shape else torch.as_tensor(array.data)
        return tensor.clone(), f"{path}:{key}" if key else path
    finally:
        container.close()


# -------------------------------------------------------------------------- chunks
@dataclass
class Chunk:
    """Rows [start, start + len) of every feature array and of the labels, on the device."""

    start: int
    features: list[torch.Tensor]
    labels: torch.Tensor
    nbytes: int


_DONE = object()


def iter_chunks(
    arrays: Sequence[Array],
    labels: Array,
    start: int,
    stop: int,
    chunk_rows: int,
    device: torch.device | str = "cpu",
) -> Iterator[Chunk]:
    """Rows [start, stop) of ``arrays`` and ``labels`` in chunks of ``chunk_rows``, read one
    chunk ahead on a background thread. For a CUDA device the thread reads into pinned
    buffers and the copy is ``non_blocking`` (the pinned allocator keeps a buffer until its
    copy is done). At most three chunks are alive: reduced, queued, being read."""
    device = torch.device(device)
    pin = device.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=1)
    stop_event = threading.Event()

    def produce() -> None:
        try:
            for lo in range(start, stop, chunk_rows):
                hi = min(lo + chunk_rows, stop)
                parts = []
                for a in [*arrays, labels]:
                    out = torch.empty((hi - lo, *a.shape[1:]), dtype=a.dtype, pin_memory=pin) if pin else None
                    parts.append(a.read(lo, hi, out=out))
                nbytes = sum(p.numel() * p.element_size() for p in parts)
                while not stop_event.is_set():
                    try:
                        q.put((lo, parts, nbytes), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop_event.is_set():
                    return
            q.put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            q.put(err)

    thread = threading.Thread(target=produce, name="collapse-ext-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            lo, parts, nbytes = item
            moved = [p.to(device, non_blocking=pin) for p in parts]
            yield Chunk(lo, moved[:-1], moved[-1], nbytes)
    finally:
        stop_event.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
