"""Hardware models: targets, profiled latency tables and predictors, memory and energy.

* :mod:`nasforge.hardware.targets`: the target registry (``get_target``, ``list_targets``).
* :mod:`nasforge.hardware.spaces`: search spaces as sums of profiled blocks.
* :mod:`nasforge.hardware.latency_table`: ``build_latency_table`` and ``LatencyTable``.
* :mod:`nasforge.hardware.predictor`: ``profile``, ``LatencyPredictor``, ``predict_latency_ms``.
* :mod:`nasforge.hardware.memory`: parameter bytes, analytic peak activations, measured RSS.
* :mod:`nasforge.hardware.energy`: RAPL / NVML meters, else labelled estimates.
"""
