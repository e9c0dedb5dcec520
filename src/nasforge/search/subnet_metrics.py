"""Every figure the search knows about one subnet, for every space.

:class:`SubnetEvaluator` cuts the subnet from the supernet with inherited weights (the search
space's :meth:`~nasforge.space.base.SearchSpace.inherited_subnet`) and scores its validation
accuracy; :class:`SubnetMetrics` adds the rest from the deployed network:
latency per target at the deployed precision (:class:`~nasforge.hardware.predictor.
LatencyPredictor`), memory (:mod:`nasforge.hardware.memory`: weights at the deployed precision plus
the peak of live activations of the ONNX graph at the search's batch size), energy per target
(:func:`~nasforge.hardware.energy.energy_per_inference`: measured with RAPL/NVML where a meter
is readable, a ``table:`` target's energy column, else estimated from power x latency; the
source is recorded), parameters, MACs and size. The result is one flat ``{metric: value}`` dict
whose keys are the columns of :mod:`nasforge.search.objectives`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from nasforge.bench.timing_export import export_for_timing, torch_single_thread
from nasforge.hardware.energy import energy_per_inference, meter_for
from nasforge.hardware.memory import onnx_param_count, param_bytes, peak_activation_bytes


class SubnetMetrics:
    """Latency, memory, energy, size, parameters and MACs of subnets.

    Args:
        predictor: Latency of a spec on every target (``targets`` and ``predict(spec)``).
        input_shape: Input shape without batch.
        precision: Deployed precision, ``"int8"`` or ``"fp32"`` (weights bytes, and the
            predictor's latency precision).
        batch_size: Batch size of latency, memory and energy.
        threads: Runtime threads (energy estimate).
    """

    def __init__(
        self,
        predictor: Any,
        input_shape: tuple[int, ...],
        precision: str,
        batch_size: int,
        threads: int,
    ) -> None:
        self.predictor = predictor
        self.input_shape = tuple(input_shape)
        self.precision = precision
        self.batch_size = batch_size
        self.threads = threads
        self.energy_sources: dict[str, str] = {}

    def sources(self) -> dict[str, str]:
        """How each metric is obtained, keyed by metric column (``pareto.json``)."""
        out = {
            "val_error": "measured: validation split, inherited supernet weights, BN recalibrated",
            "val_accuracy": "measured: validation split, inherited supernet weights",
            "memory_mb": (
                f"model: {self.precision} weights + peak live fp32 activations of the ONNX graph "
                f"at batch {self.batch_size} (runtime workspaces come on top; checked against "
                "measured RSS in benchmarks/results/memory_model.md)"
            ),
            "size_mb": f"model: parameter bytes at {self.precision} / 1e6",
            "params": "counted",
            "macs": "counted per sample (Torch-Pruning's op counter)",
        }
        described = self.predictor.describe() if hasattr(self.predictor, "describe") else {}
        for t in self.predictor.targets:
            d = described.get(t.name, {})
            src = d.get("source", "measured")
            out[f"latency_ms[{t.name}]"] = (
                f"{src}: {t.name} {d.get('precision', self.precision)} batch {self.batch_size}"
            )
            out[f"energy_mj[{t.name}]"] = self.energy_sources.get(t.name, "not measured yet")
        return out

    def measure(self, subnet: torch.nn.Module, spec: Any, arch_str: str) -> dict[str, float]:
        """All metrics of one subnet except accuracy.

        Args:
            subnet: The subnet module (weights only matter for parameter count).
            spec: Its spec, for the latency predictor.
            arch_str: Its name (table targets look latency and energy up by it).
        """
        from nasforge.compress.prune import count_macs_params

        out: dict[str, float] = {}
        latency = self.predictor.predict(spec)
        for name, ms in latency.items():
            out[f"latency_ms[{name}]"] = float(ms)
        example = torch.zeros(1, *self.input_shape)
        macs, params = count_macs_params(subnet, example)
        out["params"] = float(params)
        out["macs"] = float(macs)
        out.update(model_memory(subnet, self.input_shape, self.precision, self.batch_size))
        for t in self.predictor.targets:
            # A meter measures the model it runs: only an fp32 export can be run here.
            use_meter = self.precision == "fp32" and bool(meter_for(t.device))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "subnet.onnx"
                if use_meter:
                    with torch_single_thread():
                        export_for_timing(subnet, self.input_shape, path)
                e = energy_per_inference(
                    t,
                    out[f"latency_ms[{t.name}]"],
                    batch_size=self.batch_size,
                    threads=self.threads,
                    model_path=path if use_meter else None,
                    arch_str=arch_str,
                )
            mj = e.get("mj")
            out[f"energy_mj[{t.name}]"] = float("nan") if mj is None else float(mj)
            source, method = str(e.get("source")), str(e.get("method"))
            self.energy_sources[t.name] = (
                method if method.startswith(source) else f"{source}: {method}"
            )
        return out


def model_memory(
    module: torch.nn.Module, input_shape: tuple[int, ...], precision: str, batch_size: int
) -> dict[str, float]:
    """``size_mb`` (weights at ``precision``) and ``memory_mb`` (weights + peak live activations
    of the module's ONNX graph at ``batch_size``) of a network, in MB (1e6 bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subnet.onnx"
        with torch_single_thread():
            export_for_timing(module, tuple(input_shape), path)
        count, channels = onnx_param_count(path)
        weights = param_bytes(count, channels)[precision]
        activations = peak_activation_bytes(path, batch_size)
    return {"size_mb": weights / 1e6, "memory_mb": (weights + activations) / 1e6}


class SubnetEvaluator:
    """Scores the subnets of a trained supernet on every metric; caches repeated architectures.

    For a spec: the standalone subnet with inherited weights, BatchNorm recalibrated on the
    first ``bn_batches`` training batches (:meth:`~nasforge.space.base.SearchSpace.
    inherited_subnet`), its validation accuracy (``val_accuracy``, ``val_error``) and, with
    ``metrics``, everything :meth:`SubnetMetrics.measure` adds; without, its ``params``.

    Args:
        space: The configured :class:`~nasforge.space.base.SearchSpace`.
        supernet: The trained supernet of that space.
        x_train: Training images (BN recalibration).
        x_val: Validation images.
        y_val: Validation labels.
        bn_batches: Training batches for BN recalibration (0: keep the supernet's statistics).
        batch_size: Their size.
        metrics: A :class:`SubnetMetrics`, or None.
    """

    def __init__(
        self,
        space: Any,
        supernet: torch.nn.Module,
        x_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        *,
        bn_batches: int = 4,
        batch_size: int = 64,
        metrics: SubnetMetrics | None = None,
    ) -> None:
        self.space = space
        self.supernet = supernet
        self.x_val, self.y_val = x_val, y_val
        batches = (x_train[i * batch_size : (i + 1) * batch_size] for i in range(bn_batches))
        self.calibration = [b for b in batches if len(b)]
        self.metrics = metrics
        self.cache: dict[str, dict[str, float]] = {}

    def objective_names(self) -> list[str]:
        """The minimised columns it measures: ``val_error``, latency per target (with
        ``metrics``) and ``params``."""
        targets = [] if self.metrics is None else [t.name for t in self.metrics.predictor.targets]
        return ["val_error"] + [f"latency_ms[{n}]" for n in targets] + ["params"]

    def evaluate(self, spec: Any) -> dict[str, float]:
        """Every metric of ``spec`` (cached by its display string)."""
        from nasforge.space.cell import count_parameters
        from nasforge.training import accuracy

        key = self.space.display(spec)
        if key not in self.cache:
            subnet = self.space.inherited_subnet(self.supernet, spec, self.calibration)
            acc = accuracy(subnet, self.x_val, self.y_val)
            values = {"val_error": 1.0 - acc, "val_accuracy": acc}
            if self.metrics is None:
                values["params"] = float(count_parameters(subnet))
            else:
                values.update(self.metrics.measure(subnet, spec, key))
            self.cache[key] = values
        return self.cache[key]
