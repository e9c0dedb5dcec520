"""Hardware models: targets, latency models and tables, memory and energy.

* :mod:`nasforge.hardware.targets`: targets as data (``get_target``, ``list_targets``); what
  they run on comes from :mod:`nasforge.runtimes`.
* :mod:`nasforge.hardware.spaces`: search spaces as sums of profiled blocks.
* :mod:`nasforge.hardware.latency`: the ``LatencyModel`` protocol (table column, profiled
  table, measured) and its one dispatcher, ``latency_model``.
* :mod:`nasforge.hardware.latency_table`: the ``LatencyTable`` schema, its JSON and machine key.
* :mod:`nasforge.hardware.calibration`: fitting a table's calibration on whole networks.
* :mod:`nasforge.hardware.profiling`: ``build_latency_table`` (timing every block).
* :mod:`nasforge.hardware.table_cache`: the table cache, ``profile``, ``get_latency_table``.
* :mod:`nasforge.hardware.predictor`: ``LatencyPredictor``, every target's latency per trial.
* :mod:`nasforge.hardware.memory`: parameter bytes, analytic peak activations, measured RSS.
* :mod:`nasforge.hardware.energy`: RAPL / NVML meters, else labelled estimates.
"""
