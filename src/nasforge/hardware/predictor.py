"""The latency predictor of search: every target's latency of an architecture, per trial.

:class:`LatencyPredictor` holds one :class:`~nasforge.hardware.latency.LatencyModel` per target
(built by the one dispatcher, :func:`nasforge.hardware.latency.latency_model`) and answers
``predict(spec) -> {target: ms}``. The functions of the latency models and the table cache are
importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from nasforge.bench.sysinfo import physical_cores
from nasforge.bench.timing_export import PRECISIONS, Precision
from nasforge.errors import TargetError
from nasforge.hardware.latency import (
    LatencyModel,
    MeasuredLatency,
    ProfiledLatency,
    TableColumnLatency,
    latency_model,
    measure_module,
    predict_latency_ms,
)
from nasforge.hardware.latency_table import LatencyTable, resolve_precision
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.table_cache import (
    default_table_dir,
    get_latency_table,
    profile,
    table_path,
)
from nasforge.hardware.targets import Target, get_target

__all__ = [
    "LatencyModel",
    "LatencyPredictor",
    "MeasuredLatency",
    "ProfiledLatency",
    "TableColumnLatency",
    "default_table_dir",
    "get_latency_table",
    "latency_model",
    "measure_module",
    "predict_latency_ms",
    "profile",
    "table_path",
]


class LatencyPredictor:
    """Latency of architectures on several targets: what the search stage calls per trial.

    Args:
        targets: Target names or objects (runtime and ``table:`` targets may be mixed).
        space: Block space of the architectures (network configuration included).
        batch_size: Samples per inference.
        mode: ``"table"``: profiled tables, built once per target and cached in ``table_dir``
            (cost: one table build per target, then microseconds per prediction); ``"measure"``:
            export and time every architecture (exact; ~0.2-1 s per target for small networks;
            longer for runtimes that compile programs).
        threads: Runtime threads (default physical cores).
        table_dir: Table cache directory (default :func:`default_table_dir`).
        table_csv: CSV for ``table:`` targets.
        progress: One-line progress callback for table builds.
        precision: ``"fp32"`` (default) or ``"int8"``: the latency of the INT8 model the
            pipeline ships (measure: a PTQ copy of each subnet quantized as the runtime
            deploys INT8, ~1-2 s more per call for ONNX; table: an INT8 table). INT8 targets
            (``onnxruntime-cpu-int8``) are INT8 either way; ``table:`` targets are what their
            CSV holds.
        calibration: INT8 measure mode: calibration inputs for the PTQ copies (default a few
            random batches; latency does not depend on them).
        **build_kwargs: Passed to :func:`nasforge.hardware.profiling.build_latency_table`.

    Runtime targets that cannot run here (``tensorrt-gpu`` on a CPU machine) work in table mode
    when ``table_dir`` holds a table of them profiled where they run; otherwise, and in
    measure mode, the constructor raises a one-line :class:`TargetError`.

    Example::

        space = CellBlockSpace(CellNetworkShape(1, 10, channels=16), resolution=(8, 8))
        pred = LatencyPredictor(["onnxruntime-cpu", "openvino-cpu"], space, batch_size=1)
        pred.predict(CellSpec.from_arch_str(arch))  # {"onnxruntime-cpu": 0.05, ...}
    """

    def __init__(
        self,
        targets: Sequence[Target | str],
        space: BlockSpace,
        batch_size: int = 1,
        mode: Literal["table", "measure"] = "table",
        threads: int | None = None,
        table_dir: Path | str | None = None,
        table_csv: Path | str | None = None,
        progress: Callable[[str], None] | None = None,
        precision: Precision = "fp32",
        calibration: Any = None,
        **build_kwargs: Any,
    ) -> None:
        if mode not in ("table", "measure"):
            raise TargetError(f"latency mode must be 'table' or 'measure', got {mode!r}")
        if precision not in PRECISIONS:
            raise TargetError(
                f"latency precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        self.targets = [
            t if isinstance(t, Target) else get_target(t, table=table_csv) for t in targets
        ]
        self.precision = precision
        self.precisions = {
            t.name: resolve_precision(t, precision) for t in self.targets if t.kind == "runtime"
        }
        self.space = space
        self.batch_size = batch_size
        self.mode = mode
        self.threads = int(threads or physical_cores())
        self.calibration = calibration
        self.table_dir = Path(table_dir or default_table_dir())
        self.models: dict[str, LatencyModel] = {
            t.name: latency_model(
                t,
                space,
                mode=mode,
                batch_sizes=(batch_size,),
                threads=self.threads,
                table_dir=self.table_dir,
                precision=self.precisions.get(t.name, precision),  # type: ignore[arg-type]
                calibration=calibration,
                progress=progress,
                **build_kwargs,
            )
            for t in self.targets
        }

    @property
    def tables(self) -> dict[str, LatencyTable]:
        """The profiled table of each target predicted from one."""
        return {n: m.table for n, m in self.models.items() if isinstance(m, ProfiledLatency)}

    def predict(self, spec: Any) -> dict[str, float]:
        """Latency in ms of ``spec`` on every target, keyed by target name."""
        return {t.name: self.predict_one(t, spec) for t in self.targets}

    def predict_one(self, target: Target, spec: Any) -> float:
        """Latency in ms of ``spec`` on one of this predictor's targets."""
        return self.models[target.name].predict_ms(spec, self.batch_size)

    def describe(self) -> dict[str, Any]:
        """How each target's latency is obtained, and at which precision (for search outputs)."""
        return {name: model.describe() for name, model in self.models.items()}
