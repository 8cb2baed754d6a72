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

Modules: ``arrays`` (the rows of one on-disk array, per format, and shards concatenated),
``files`` (an open file of any format: its keys and arrays), ``shards`` (a source's files:
one, a directory or a glob; small tensors by ``FILE[:key]``), ``prefetch`` (chunks read
one ahead on a background thread).
"""

from .arrays import Array
from .files import FORMATS
from .prefetch import Chunk, iter_chunks
from .shards import Source, load_tensor, open_array, shard_paths

__all__ = [
    "FORMATS",
    "Array",
    "Chunk",
    "Source",
    "iter_chunks",
    "load_tensor",
    "open_array",
    "shard_paths",
]
