"""ExecuTorch, PyTorch's edge runtime, with the XNNPACK delegate on the CPU.

* files: ``executorch/fp32.pte`` (the float model) and ``executorch/int8.pte``: the float model
  quantized by ExecuTorch's own pt2e quantizer (``XNNPACKQuantizer``: int8 symmetric
  activations per tensor, int8 symmetric weights per channel, static, calibrated on real
  inputs), since XNNPACK runs its own INT8 scheme rather than the QAT stage's x86 one; the
  same INT8 model is also exported as ``executorch/int8.onnx``, the ONNX twin promotion
  registers. Programs come from ``torch.export`` with a dynamic batch up to the bundle's
  largest batch, lowered with ``to_edge_transform_and_lower`` and the ``XnnpackPartitioner``
  (operators XNNPACK lacks run in ExecuTorch's portable kernels). Each program carries two
  constant methods, ``nasforge_int8`` and ``nasforge_max_batch``, so a ``.pte`` says what it is.
* sessions: ``executorch.runtime`` (the Python bindings of the C++ runtime) with XNNPACK's thread
  pool set to the measurement's threads; any batch up to the planned maximum.
* targets: ``executorch-xnnpack-cpu``, ``executorch-xnnpack-cpu-int8``.

Install with ``pip install 'nasforge[executorch]'`` (``make install`` does).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.atomic import atomic_file
from nasforge.errors import ModelFileError, TargetError
from nasforge.runtimes.base import Exported, ExportSources, Runtime, Session, first_line
from nasforge.runtimes.registry import register_runtime

#: The XNNPACK quantizer's scheme (recorded with the INT8 model and its benchmarks).
QUANTIZATION: dict[str, Any] = {
    "method": "torchao pt2e prepare_pt2e/convert_pt2e (PTQ) with ExecuTorch's XNNPACKQuantizer",
    "activations": "int8 symmetric per-tensor, static",
    "weights": "int8 symmetric per-channel",
    "calibration": "MinMax observers on real inputs of the training split",
}
_INT8 = "nasforge_int8"
_MAX_BATCH = "nasforge_max_batch"
_TIMING_MAX_BATCH = 64


def _quiet_export() -> Any:
    """Silence torch.export's and ExecuTorch's warnings and progress output."""
    import contextlib
    import io
    import logging
    import warnings

    @contextlib.contextmanager
    def quiet() -> Any:
        names = ("torch.export", "torch._dynamo", "executorch", "torch.fx")
        loggers = [logging.getLogger(n) for n in names]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        finally:
            for lg, lvl in zip(loggers, levels, strict=True):
                lg.setLevel(lvl)

    return quiet()


def _export(module: Any, example: Any, max_batch: int) -> Any:
    """``torch.export`` with a dynamic batch of 1..max_batch (the example needs >= 2 rows)."""
    import torch

    if example.shape[0] < 2:
        example = torch.cat([example, example])
    # A batch with one channel may carry channels-last strides (numpy's ``[:, None]`` gives
    # them); torch.export records the example's dim order, and the program would then reject
    # every NCHW input at run time. Standard strides make it an NCHW program.
    example = example[:2].clone(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1, max=max(2, int(max_batch)))
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _lower(program: Any, max_batch: int, int8: bool) -> bytes:
    """Lower an exported program to the XNNPACK delegate; the ``.pte`` bytes."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.utils._sympy.value_ranges import ValueRanges

    lowered = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        constant_methods={_INT8: int(int8), _MAX_BATCH: int(max_batch)},
    )
    # Re-tracing a convolution with fake tensors during XNNPACK's preprocessing refines the
    # batch symbol's range from a backend-selection guard (torch 2.13: to [2, 15]); memory
    # would then be planned for 15 rows. The delegate takes any batch, so the range the
    # program was exported with is put back before memory planning.
    for node in lowered.exported_program().graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        for dim in val.shape:
            if isinstance(dim, torch.SymInt):
                env = dim.node.shape_env
                env.var_to_range[dim.node.expr] = ValueRanges(1, int(max_batch))
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    return lowered.to_executorch(config).buffer


def _check_header(path: Path) -> None:
    """Raise a one-line :class:`ModelFileError` unless ``path`` starts like an ExecuTorch
    program (a flatbuffer with file identifier ``ET`` + two digits).

    The runtime logs a foreign identifier's raw bytes, and its Python log handler aborts the
    process on bytes that are not UTF-8 (executorch 1.5.1), so foreign files never reach it.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    ident = head[4:8]
    if len(head) < 8 or ident[:2] != b"ET" or not ident[2:].isdigit():
        raise ModelFileError(f"{path} is not an ExecuTorch program (no ET flatbuffer header)")


def _write(buffer: bytes, path: Path) -> Path:
    with atomic_file(path, suffix=".pte") as tmp:
        tmp.write_bytes(buffer)
    return path


def quantize_xnnpack(module: Any, calibration: np.ndarray, example: Any, max_batch: int) -> Any:
    """The float ``module`` quantized by ExecuTorch's ``XNNPACKQuantizer`` (pt2e PTQ).

    Args:
        module: The float model (not modified).
        calibration: Calibration inputs ``(N, *input_shape)``.
        example: An example batch.
        max_batch: Largest batch of the dynamic batch dimension.

    Returns:
        The converted (quantize/dequantize) ``GraphModule``.
    """
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    float_model = copy.deepcopy(module).eval()
    prepared = prepare_pt2e(_export(float_model, example, max_batch).module(), quantizer)
    data = torch.as_tensor(np.asarray(calibration, dtype=np.float32))
    with torch.no_grad():
        for i in range(0, len(data), 32):
            prepared(data[i : i + 32])
    return convert_pt2e(prepared)


@register_runtime
class ExecuTorch(Runtime):
    """ExecuTorch with the XNNPACK delegate (CPU)."""

    name = "executorch"
    label = "ExecuTorch"
    file_kind = "ExecuTorch program"
    packages = ("executorch",)
    suffixes = (".pte",)
    targets = (
        ("executorch-xnnpack-cpu", "cpu", "fp32"),
        ("executorch-xnnpack-cpu-int8", "cpu", "int8"),
    )

    def availability_problem(self, device: str = "cpu") -> str | None:
        if importlib.util.find_spec("executorch") is None:
            return "executorch not installed (pip install 'nasforge[executorch]')"
        if device != "cpu":
            return f"nasforge runs ExecuTorch's XNNPACK delegate on the CPU, not '{device}'"
        return None

    def layout(self, precision: str) -> str:
        return f"executorch/{precision}.pte"

    def onnx_twin(self, precision: str) -> str:
        # The INT8 program is quantized by XNNPACK's scheme, not the QAT stage's: its ONNX twin
        # is exported from the same converted model.
        return "executorch/int8.onnx" if precision == "int8" else f"{precision}.onnx"

    # ------------------------------------------------------------------ export
    def export(self, sources: ExportSources, precision: str, bundle: Path) -> Exported:
        """The ``.pte`` of ``precision`` from torch (INT8: XNNPACK PTQ, plus its ONNX twin)."""
        import torch

        path = Path(bundle) / self.layout(precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        example = torch.as_tensor(sources.example)
        with _quiet_export(), torch.no_grad():
            if precision == "fp32":
                program = _export(copy.deepcopy(sources.fp32).eval(), example, sources.max_batch)
                _write(_lower(program, sources.max_batch, int8=False), path)
                return Exported(path)
            quantized = quantize_xnnpack(
                sources.fp32, sources.calibration, example, sources.max_batch
            )
            program = _export(quantized, example, sources.max_batch)
            _write(_lower(program, sources.max_batch, int8=True), path)
        from nasforge.export.onnx import export_int8

        export_int8(quantized, example, Path(bundle) / self.onnx_twin("int8"))
        return Exported(path, reference=quantized, quantization=QUANTIZATION)

    def export_for_timing(
        self,
        module: Any,
        input_shape: tuple[int, ...],
        path: Path,
        precision: str = "fp32",
        calibration: np.ndarray | None = None,
        exporter: str = "torchscript",
    ) -> Path:
        """A ``.pte`` of ``module`` (INT8: XNNPACK PTQ on ``calibration`` or random batches,
        which is enough for latency). ``exporter`` does not apply: there is one way."""
        import torch

        del exporter
        path = Path(path).with_suffix(".pte")
        example = torch.randn(2, *input_shape)
        with _quiet_export(), torch.no_grad():
            module = copy.deepcopy(module).eval()
            if precision == "int8":
                if calibration is None:
                    rng = np.random.default_rng(0)
                    calibration = rng.standard_normal((8, *input_shape)).astype(np.float32)
                module = quantize_xnnpack(module, calibration, example, _TIMING_MAX_BATCH)
            program = _export(module, example, _TIMING_MAX_BATCH)
            return _write(_lower(program, _TIMING_MAX_BATCH, int8=precision == "int8"), path)

    # ------------------------------------------------------------------ sessions
    def _load(self, path: Path, threads: int | None) -> tuple[Any, Any, bool, int]:
        """Program, forward method, whether it is INT8, and its largest batch."""
        try:
            import executorch.extension.pybindings.portable_lib as lib
            from executorch.runtime import Runtime as EtRuntime
            from executorch.runtime import Verification
        except ImportError as e:
            raise TargetError(f"ExecuTorch is not usable here: {first_line(e)}") from e
        if threads:
            # XNNPACK's thread pool is one per process: sessions set it to what they time with.
            lib._unsafe_reset_threadpool(int(threads))
        runtime = EtRuntime.get()
        if not runtime.backend_registry.is_available("XnnpackBackend"):
            raise TargetError("this ExecuTorch build has no XNNPACK backend")
        _check_header(Path(path))
        try:
            # InternalConsistency runs the flatbuffer verifier: a corrupt program is a load
            # error rather than a crash while its methods are read.
            program = runtime.load_program(
                Path(path), verification=Verification.InternalConsistency
            )
            method = program.load_method("forward")
        except Exception as e:  # the bindings raise RuntimeError for a bad or foreign file
            raise ModelFileError(f"cannot load {path} in ExecuTorch: {first_line(e)}") from e
        if method is None:
            raise ModelFileError(f"{path} has no forward method")

        def constant(name: str, default: int) -> int:
            if name not in program.method_names:
                return default
            out = program.load_method(name).execute([])
            return int(out[0])

        int8 = bool(constant(_INT8, 0))
        max_batch = constant(_MAX_BATCH, int(method.metadata.input_tensor_meta(0).sizes()[0]))
        return program, method, int8, max_batch

    def open_session(
        self,
        path: Path,
        device: str,
        batch_size: int,
        input_shape: tuple[int, ...] | None,
        threads: int,
    ) -> Session:
        import torch

        program, method, int8, max_batch = self._load(path, threads)
        meta = method.metadata
        if meta.num_inputs() != 1:
            raise ModelFileError(f"{path}: forward takes {meta.num_inputs()} inputs, not 1")
        sample = tuple(int(d) for d in meta.input_tensor_meta(0).sizes()[1:])
        if input_shape is not None and tuple(int(d) for d in input_shape) != sample:
            raise ModelFileError(
                f"{path}: the program takes inputs of shape {list(sample)}, not {list(input_shape)}"
            )
        if batch_size > max_batch:
            raise ModelFileError(
                f"{path}: batch {batch_size} exceeds the {max_batch} rows its memory is planned "
                "for (export it with a larger benchmark batch size)"
            )

        def run(x: np.ndarray) -> np.ndarray:
            out = method.execute([torch.from_numpy(np.ascontiguousarray(x))])
            return out[0].numpy()

        run.program = program  # type: ignore[attr-defined]  # keeps the program alive
        return Session(
            run=run,
            input_shape=(batch_size, *sample),
            input_dtype=np.float32,
            precision="int8" if int8 else "fp32",
            executed_precision="int8+fp32" if int8 else "fp32",
            runtime=self.name,
            runtime_version=self.version(),
            dynamic_batch=True,
        )

    def runner(
        self,
        path: Path,
        threads: int | None = None,
        all_outputs: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[[np.ndarray], Any]:
        import torch

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        program, method, _, max_batch = self._load(path, threads)

        def run(x: np.ndarray) -> Any:
            outs = []
            x = np.ascontiguousarray(x, dtype=np.float32)
            for i in range(0, max(1, len(x)), max_batch):
                got = method.execute([torch.from_numpy(x[i : i + max_batch])])
                outs.append([o.numpy() for o in got])
            merged = [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
            return merged if all_outputs else merged[0]

        run.program = program  # type: ignore[attr-defined]
        return run
