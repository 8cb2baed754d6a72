"""Training-loop integration: :class:`CollapseMonitor` and its :class:`MonitorResult`.

Modules: ``result`` (the result type and its formatting), ``layer`` (the per-layer buffer
and the session of one measurement), ``hooks`` (module resolution, pooling, the hooks and
the recording API), ``distributed`` (merging across ranks), ``persistence``
(``state_dict``/``load_state_dict``), ``monitor`` (:class:`CollapseMonitor`: construction,
``compute`` and ``evaluate``).
"""

from .hooks import PENULTIMATE
from .monitor import CollapseMonitor
from .result import MonitorResult

__all__ = ["PENULTIMATE", "CollapseMonitor", "MonitorResult"]
