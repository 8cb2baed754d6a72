"""A source's files (one file, a directory or a glob of shards, in name order) opened
together, one array per key concatenated over them; and small tensors by ``FILE[:key]``."""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Sequence
from typing import Any

import torch

from .arrays import Array, _Concat, _ext, _shown
from .files import FORMATS, _Container


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
