"""The artifacts passed between stages: one versioned dataclass with ``read``/``write`` each.

* :mod:`~nasforge.artifacts.dataset` — the prepared dataset (``dataset.npz`` + ``meta.json``);
* :mod:`~nasforge.artifacts.search_result` — the search's ``pareto.json`` (and ``history.json``);
* :mod:`~nasforge.artifacts.model` — a trained network folder (dense or pruned: one format);
* :mod:`~nasforge.artifacts.quantized_model` — the INT8 program and its description;
* :mod:`~nasforge.artifacts.export_bundle` — exported files of every runtime (``export.json``);
* :mod:`~nasforge.artifacts.benchmark_report` — one candidate on one target (``benchmark.json``);
* :mod:`~nasforge.artifacts.promotion` — the promotion decisions (``promotion.json``).

Every document carries its schema name and version (:mod:`~nasforge.artifacts.base`); stages,
the server and the benchmarks read and write them only through these classes, so no stage
imports another for file names or loaders. The package imports no submodule itself: a server
reading a benchmark report does not load torch.
"""
