"""The :class:`Runtime` interface every inference backend implements, and what it works with.

A runtime owns everything nasforge does with one inference engine:

* its **file layout** in an export bundle (:meth:`Runtime.layout`, :meth:`Runtime.model_files`,
  :attr:`Runtime.suffixes`) and the ONNX file that is the same model (:meth:`Runtime.onnx_twin`,
  what promotion registers as the MLflow ONNX flavour);
* its **export**, from the bundle's ONNX graphs or from torch (:meth:`Runtime.export`), and a
  quick export of any module for timing (:meth:`Runtime.export_for_timing`: latency tables,
  search-time measurement);
* **sessions** with a fixed thread count and batch size (:meth:`Runtime.open_session`), which
  the one measurement harness (:mod:`nasforge.bench.harness`) times, and dynamic-batch runners
  (:meth:`Runtime.runner`) for parity and staged early exit;
* **parity** of an exported file with its torch model (:meth:`Runtime.parity`);
* its **targets** (:attr:`Runtime.targets`: name, device, precision), its availability on this
  machine, its version, and how Triton serves its files (:attr:`Runtime.triton`).

A backend is one module in :mod:`nasforge.runtimes` whose class is decorated with
:func:`nasforge.runtimes.registry.register_runtime`; nothing outside that package compares a
runtime's name.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nasforge.errors import ModelFileError

PRECISIONS: tuple[str, ...] = ("fp32", "int8")
#: Runtime name of ``table:<column>`` targets: they run nothing.
TABLE = "table"

ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


@dataclasses.dataclass
class Session:
    """A ready-to-run inference session on one runtime with a fixed input shape.

    Attributes:
        run: Call with a batch (numpy, shape ``input_shape``) and get the first output.
        input_shape: Full input shape including batch.
        input_dtype: Numpy dtype of the input.
        precision: ``"fp32"`` or ``"int8"`` (from the model file).
        executed_precision: What the runtime executes (see
            :class:`nasforge.bench.harness.LatencyResult`).
        runtime: The runtime's name (``"onnxruntime"``, ``"openvino"``, ...).
        runtime_version: Version string.
        dynamic_batch: The session also takes any smaller batch (no padding needed).
    """

    run: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...]
    input_dtype: Any
    precision: str
    executed_precision: str
    runtime: str
    runtime_version: str
    dynamic_batch: bool = False


@dataclasses.dataclass(frozen=True)
class ExportSources:
    """What one candidate's export bundle is made from (see :meth:`Runtime.export`).

    Attributes:
        fp32: The float model (eval mode).
        int8: The INT8 model of the QAT stage (pt2e-converted program: ``ExportedProgram`` or
            ``GraphModule``) in its own quantization scheme.
        example: A batch of real inputs (NCHW float32).
        calibration: Real inputs for runtimes that quantize in a scheme of their own (PTQ).
        onnx: ``{precision: path}`` of the bundle's ONNX graphs, written first by the base
            runtime; runtimes that convert ONNX read them.
        max_batch: The largest batch the bundle's models must take (runtimes that plan memory
            for an upper bound use it).
    """

    fp32: Any
    int8: Any
    example: Any
    calibration: np.ndarray
    onnx: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    max_batch: int = 128


@dataclasses.dataclass(frozen=True)
class Exported:
    """One model a runtime wrote into a bundle.

    Attributes:
        path: The file the runtime loads.
        reference: The torch model the file must agree with (parity); ``None``: the bundle's
            own model of that precision (the float model, or the QAT program).
        quantization: How the file was quantized when not by the QAT stage's scheme.
    """

    path: Path
    reference: Any = None
    quantization: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class TritonModel:
    """How Triton Inference Server serves a runtime's files (see :mod:`nasforge.serve.triton`).

    Attributes:
        backend: Triton backend name (``"onnxruntime"``, ``"openvino"``).
        gpu: Instances run on a GPU (``KIND_GPU``).
        accelerator: Execution accelerator (name and parameters), if any.
        default_file: The file the backend loads unless told otherwise.
    """

    backend: str
    gpu: bool = False
    accelerator: Mapping[str, Any] | None = None
    default_file: str = "model.onnx"


def first_line(e: BaseException) -> str:
    """The informative first line of a runtime's (often multi-line) error message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # OpenVINO prefixes messages with source locations ("Exception from src/...:84:").
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = (useful or lines or [type(e).__name__])[0]
    return text[:300]


def resolve_shape(
    model_shape: list[Any], batch_size: int, input_shape: tuple[int, ...] | None, path: Path
) -> tuple[int, ...]:
    """Full static input shape from the model's (possibly symbolic) shape and the request."""
    if input_shape is not None:
        shape = (batch_size, *(int(d) for d in input_shape))
        if len(model_shape) and len(model_shape) != len(shape):
            raise ModelFileError(
                f"{path}: model input has rank {len(model_shape)}, requested shape {shape}"
            )
        return shape
    rest = model_shape[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise ModelFileError(
            f"{path}: input shape {model_shape} is not static beyond the batch dimension; "
            "pass input_shape"
        )
    return (batch_size, *rest)


def onnx_is_quantized(model_path: Path) -> bool:
    """True if an ONNX graph holds quantization ops (QDQ or QLinear*)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / various on corrupt files
        raise ModelFileError(f"cannot read ONNX model {model_path}: {first_line(e)}") from e
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})


def package_version(*distributions: str) -> str:
    """Version of the first installed distribution among ``distributions``, or ``""``."""
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def compare_outputs(
    torch_fn: Callable[[Any], Any],
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    batch_size: int,
    runtime: str,
    min_top1: float,
) -> dict[str, Any]:
    """Top-1 agreement and largest absolute difference of ``run`` against ``torch_fn``."""
    import torch

    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    agree, max_diff = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            xb = xs[i : i + batch_size]
            ref = torch_fn(torch.from_numpy(xb)).detach().cpu().numpy()
            got = run(xb)
            if got.shape != ref.shape:
                raise RuntimeError(f"output shape {got.shape} != torch output shape {ref.shape}")
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
    n = len(xs)
    top1 = agree / n if n else 0.0
    return {
        "top1_agreement": top1,
        "max_abs_diff": max_diff,
        "n": n,
        "runtime": runtime,
        "passed": bool(top1 >= min_top1),
        "min_top1": float(min_top1),
    }


def torch_callable(model: Any) -> Callable[[Any], Any]:
    """A callable of a torch reference: an ``nn.Module``, a converted GraphModule, an
    ExportedProgram or any ``Tensor -> Tensor`` function."""
    import torch
    from torch import nn
    from torch.export import ExportedProgram

    if isinstance(model, ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        model.eval()  # GraphModules from torch.export ignore .eval(); they are converted in eval
    return model


class Runtime(ABC):
    """One inference backend. Subclass it in a module of :mod:`nasforge.runtimes` and decorate
    the class with :func:`~nasforge.runtimes.registry.register_runtime`.

    Class attributes:
        name: Registry name, also the key of its files in ``export.json`` (``runtime/precision``).
        label: Human-readable name for messages (``"ONNX Runtime"``).
        file_kind: What its own model file is called in messages (``"ONNX model"``).
        packages: Distributions whose version is the runtime's version (first installed wins).
        suffixes: Model files it loads, preferred first.
        targets: ``(name, device, precision)`` of the targets it runs.
        folds_constants: It compiles static shapes and folds input-independent computation
            (latency tables count blocks accordingly).
        reads: Name of the runtime whose bundle files this one loads (it exports nothing of its
            own; its parity is that runtime's), or ``None``.
        exported_by_default: The export stage writes its files even when no target of the run
            uses it (cheap conversions the serving and Triton paths expect).
        triton: How Triton serves its files, or ``None`` (no Triton backend).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    file_kind: ClassVar[str] = "model"
    packages: ClassVar[tuple[str, ...]] = ()
    suffixes: ClassVar[tuple[str, ...]] = ()
    targets: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    folds_constants: ClassVar[bool] = False
    reads: ClassVar[str | None] = None
    exported_by_default: ClassVar[bool] = False
    triton: ClassVar[TritonModel | None] = None

    # ------------------------------------------------------------------ identity, availability
    def version(self) -> str:
        """Version of the runtime here (``""`` when it is not installed)."""
        return package_version(*self.packages)

    @abstractmethod
    def availability_problem(self, device: str = "cpu") -> str | None:
        """Why this runtime cannot run on ``device`` here, or ``None`` if it can."""

    def export_problem(self) -> str | None:
        """Why this runtime cannot write its bundle files here, or ``None`` if it can."""
        return self.availability_problem("cpu")

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (name, version, files it loads)."""
        return {"name": self.name, "version": self.version(), "suffixes": list(self.suffixes)}

    # ------------------------------------------------------------------ files
    @abstractmethod
    def layout(self, precision: str) -> str:
        """Path, relative to an export bundle, of this runtime's model of ``precision``."""

    def onnx_twin(self, precision: str) -> str:
        """Path (in a bundle) of the ONNX graph that is the same model as :meth:`layout`'s file:
        what promotion registers as the MLflow ONNX flavour, and what the memory model reads."""
        return f"{precision}.onnx"

    def model_files(self, main: Path) -> list[Path]:
        """The files one model is made of, the one to load first (an IR's ``.bin``, ...)."""
        return [Path(main)]

    def pick_file(self, files: list[Path]) -> Path | None:
        """The file of ``files`` this runtime loads (by :attr:`suffixes`, preferred first)."""
        for suffix in self.suffixes:
            found = sorted(f for f in files if f.suffix == suffix)
            if found:
                return found[0]
        return None

    def io_names(self, path: Path) -> tuple[str, str]:
        """Names of the first input and output of one of this runtime's own files (what a
        Triton config of it must use).

        Raises:
            ModelFileError: The runtime cannot tell (its files are served as ONNX).
        """
        raise ModelFileError(f"{self.label} files are served by Triton as ONNX graphs: {path}")

    # ------------------------------------------------------------------ export
    def export(self, sources: ExportSources, precision: str, bundle: Path) -> Exported:
        """Write this runtime's model of ``precision`` into the bundle folder.

        The default writes nothing: the runtime loads the bundle's ONNX graph as it is.

        Returns:
            The :class:`Exported` file (atomically written) and the torch model it must agree
            with.
        """
        return Exported(Path(bundle) / self.layout(precision))

    def export_for_timing(
        self,
        module: Any,
        input_shape: tuple[int, ...],
        path: Path,
        precision: str = "fp32",
        calibration: np.ndarray | None = None,
        exporter: str = "torchscript",
    ) -> Path:
        """Export a module quickly to a file this runtime times (latency tables, search).

        The default is the ONNX timing export (:func:`nasforge.bench.timing_export.
        export_for_timing`): ``exporter`` is its ``"torchscript"`` or ``"dynamo"``; INT8 is a
        PTQ QDQ copy in the deployed layout. ``path``'s suffix is replaced by the runtime's.

        Returns:
            The written file.
        """
        from nasforge.bench.timing_export import export_for_timing

        return export_for_timing(
            module,
            input_shape,
            Path(path).with_suffix(".onnx"),
            exporter,  # type: ignore[arg-type]
            precision,  # type: ignore[arg-type]
            calibration,
        )

    # ------------------------------------------------------------------ sessions
    @abstractmethod
    def open_session(
        self,
        path: Path,
        device: str,
        batch_size: int,
        input_shape: tuple[int, ...] | None,
        threads: int,
    ) -> Session:
        """A session for ``path`` (already checked by :meth:`check_file`) at ``batch_size``.

        Raises:
            ModelFileError: The runtime cannot load or compile the file.
            TargetError: The runtime cannot run on ``device`` here.
        """

    @abstractmethod
    def runner(
        self,
        path: Path,
        threads: int | None = None,
        all_outputs: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[[np.ndarray], Any]:
        """A dynamic-batch callable ``x -> first output`` (``all_outputs``: the list of every
        output), for parity checks and staged early exit (CPU).

        Raises:
            ModelFileError: Missing or unloadable file.
        """

    # ------------------------------------------------------------------ parity
    def parity(
        self,
        reference: Any,
        path: Path,
        x: Any,
        batch_size: int = 256,
        threads: int | None = None,
        min_top1: float = 0.99,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Compare an exported file with its torch model on inputs ``x`` (see
        :func:`nasforge.export.parity.check_parity`)."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        run = self.runner(path, threads, options=options)
        return compare_outputs(
            torch_callable(reference), run, np.asarray(x), batch_size, self.name, min_top1
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
