"""Neural-collapse metrics of saved features: :func:`analyze` (``collapse-ext analyze``).

One streaming pass over the rows accumulates a :class:`~collapse_ext.ClassStats` per
feature key (S_W included when d <= 4096); a second pass runs only for what needs the
final class means: NC4 (``ncc=True``, the default) and the projected NC1 (``nc1_mode``
"projected", or "auto" when d > 4096). The projected pass accumulates the statistics of
Q^T h, Q (d, r) an orthonormal basis of the centred means' span: NC1 and the separation
fuzziness only see Sigma_W through that span (Sigma_B^+ lives in it), so they equal the
full-S_W values without the (d, d) matrix.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank reads its own contiguous row range and
the statistics merge exactly through ``ClassStats.all_reduce`` (gloo or nccl); every
rank ends with the same result.

Modules: ``result`` (:class:`AnalyzeResult`, its ``--json`` object and summary),
``inputs`` (opening and checking the features, labels and classifier), ``distributed``
(rank, world and agreement on errors under ``torchrun``), ``passes`` (the streaming
passes and the bundles), ``run`` (:func:`analyze`: argument checks, device, process
group). No submodule is called ``analyze``: importing one would replace the function
:func:`analyze` of this package by the module of that name.
"""

from .passes import FULL_SCATTER_MAX_DIM
from .result import AnalyzeResult
from .run import analyze

__all__ = ["FULL_SCATTER_MAX_DIM", "AnalyzeResult", "analyze"]
