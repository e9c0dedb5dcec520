"""OpenVINO: IR converted from the bundle's ONNX graphs, FP32 pinned.

* files: ``openvino/fp32.xml`` and ``openvino/int8.xml`` (each with its ``.bin``), converted from
  ``fp32.onnx`` / ``int8.onnx`` (:func:`nasforge.export.openvino.to_openvino_ir`); sessions also
  read ONNX directly;
* sessions: the CPU plugin with ``INFERENCE_PRECISION_HINT=f32`` (bf16-capable CPUs would
  otherwise silently run bf16), ``INFERENCE_NUM_THREADS``, ``PERFORMANCE_HINT=LATENCY``, one
  stream, a static input shape (what is timed is what is deployed); the precision really
  executed is read back from the compiled model;
* targets: ``openvino-cpu``, ``openvino-cpu-int8``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.errors import ModelFileError
from nasforge.runtimes.base import (
    Exported,
    ExportSources,
    Runtime,
    Session,
    TritonModel,
    first_line,
    onnx_is_quantized,
    resolve_shape,
)
from nasforge.runtimes.registry import register_runtime

# Runtime-model layer types that only move or hold data: left out of "executed precision".
_NON_COMPUTE = {"Input", "Output", "Const", "Reorder", "Reshape", "Parameter", "Result"}


def _executed_precision(compiled: Any) -> str:
    """Element types the compiled OpenVINO model's compute layers really run in."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" not in info or "layerType" not in info:
            continue
        if info["layerType"].astype(str) in _NON_COMPUTE:
            continue
        prec = info["runtimePrecision"].astype(str)
        counts[prec] = counts.get(prec, 0) + 1
    if not counts:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return "+".join(p for p, _ in sorted(counts.items(), key=lambda kv: -kv[1]))


@register_runtime
class OpenVino(Runtime):
    """The OpenVINO CPU plugin."""

    name = "openvino"
    label = "OpenVINO"
    file_kind = "OpenVINO IR"
    packages = ("openvino",)
    suffixes = (".xml", ".onnx")
    targets = (("openvino-cpu", "cpu", "fp32"), ("openvino-cpu-int8", "cpu", "int8"))
    folds_constants = True
    exported_by_default = True
    triton = TritonModel("openvino", default_file="model.xml")

    def availability_problem(self, device: str = "cpu") -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino not installed (pip install 'nasforge[openvino]')"
        if device != "cpu":
            return f"nasforge runs OpenVINO on the CPU plugin, not '{device}'"
        return None

    def layout(self, precision: str) -> str:
        return f"openvino/{precision}.xml"

    def model_files(self, main: Path) -> list[Path]:
        main = Path(main)
        return [main, main.with_suffix(".bin")] if main.suffix == ".xml" else [main]

    def export(self, sources: ExportSources, precision: str, bundle: Path) -> Exported:
        """The IR of the bundle's ONNX graph of ``precision`` (FP32 weights kept)."""
        from nasforge.export.openvino import to_openvino_ir

        path = Path(bundle) / self.layout(precision)
        to_openvino_ir(sources.onnx[precision], path)
        return Exported(path)

    def io_names(self, path: Path) -> tuple[str, str]:
        """Names of the IR's first input and output (Triton's config must use them)."""
        import openvino as ov

        try:
            m = ov.Core().read_model(str(path))
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"cannot read OpenVINO IR {path}: {e}") from e
        return m.inputs[0].get_any_name(), m.outputs[0].get_any_name()

    def open_session(
        self,
        path: Path,
        device: str,
        batch_size: int,
        input_shape: tuple[int, ...] | None,
        threads: int,
    ) -> Session:
        import openvino as ov

        # Parse ONNX with onnx first: a clean error for corrupt files, and OpenVINO does not then
        # probe every frontend (the TF frontend logs parse errors to stderr).
        onnx_quantized = path.suffix == ".onnx" and onnx_is_quantized(path)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line message
            raise ModelFileError(f"cannot load {path} in OpenVINO: {first_line(e)}") from e
        quantized = onnx_quantized or any(
            op.get_type_name() == "FakeQuantize" for op in model.get_ops()
        )
        port = model.inputs[0]
        pshape = port.get_partial_shape()
        model_shape = [d.get_length() if d.is_static else -1 for d in pshape]
        shape = resolve_shape(model_shape, batch_size, input_shape, path)
        # A static shape lets the CPU plugin pick its best kernels; what we time is what we deploy.
        model.reshape({port: ov.PartialShape(list(shape))})
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        try:
            compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise ModelFileError(f"OpenVINO cannot compile {path}: {first_line(e)}") from e
        request = compiled.create_infer_request()
        dtype = port.get_element_type().to_dtype()

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()

        return Session(
            run=run,
            input_shape=shape,
            input_dtype=dtype,
            precision="int8" if quantized else "fp32",
            executed_precision=_executed_precision(compiled),
            runtime=self.name,
            runtime_version=ov.__version__,
        )

    def runner(
        self,
        path: Path,
        threads: int | None = None,
        all_outputs: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[[np.ndarray], Any]:
        """A dynamic-batch compiled model; ``options["inference_precision"]`` is the
        ``INFERENCE_PRECISION_HINT`` (default ``"f32"``, so FP32 is really FP32)."""
        from nasforge.export.openvino import compile_model

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        hint = (options or {}).get("inference_precision", "f32")
        # The batch stays dynamic: parity runs a smaller last batch, early-exit stages fewer rows.
        compiled = compile_model(path, precision=hint, threads=threads, performance_hint="LATENCY")
        request = compiled.create_infer_request()
        n_out = len(compiled.outputs)
        if all_outputs:

            def run_all(x: np.ndarray) -> list[np.ndarray]:
                request.infer({0: x})
                return [request.get_output_tensor(i).data.copy() for i in range(n_out)]

            return run_all
        out = compiled.output(0)
        return lambda x: np.asarray(request.infer([x])[out]).copy()
