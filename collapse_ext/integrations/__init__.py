"""Adapters for third-party libraries, each imported only when used (SPEC: "Language
models"): ``import collapse_ext`` imports none of them.

- :mod:`collapse_ext.integrations.transformers`: :class:`LMCollapseMonitor` for causal
  language models of Hugging Face ``transformers`` (the vocabulary as classes).
- :mod:`collapse_ext.integrations.frequency`: its frequency views (token buckets by n_k,
  the statistics of a subset of classes, :class:`LMResult`).
"""
