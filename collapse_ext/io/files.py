"""An open file of any supported format: ``keys()`` (None for a single-array file) and
``array(key)``; errors name the argument ("Expected `source` to be a readable .npz file,
got 'x.npz' (...)")."""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import numpy as np
import torch

from .arrays import Array, _ext, _NpzMember, _NumpyArray, _SafetensorsArray, _shown, _wrap

FORMATS = (".npy", ".npz", ".pt", ".pth", ".safetensors", ".h5", ".hdf5")


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
