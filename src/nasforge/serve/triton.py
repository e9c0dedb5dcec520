"""Export a Triton Inference Server model repository with dynamic batching per runtime.

One Triton model per runtime that Triton can serve (:attr:`nasforge.runtimes.base.Runtime.
triton`), named ``<name>-<runtime>``::

    <repo>/<name>-onnxruntime/config.pbtxt   1/model.onnx
    <repo>/<name>-openvino/config.pbtxt      1/model.xml 1/model.bin
    <repo>/<name>-tensorrt/config.pbtxt      1/model.onnx

Each runtime says which Triton backend serves it, on CPU or GPU instances, with which
execution accelerator: ``tensorrt`` is the ONNX Runtime backend with TensorRT as GPU execution
accelerator (Triton builds the engine on the GPU it runs on), so no TensorRT plan has to be built
on a machine with the same GPU beforehand. A runtime's own file (the OpenVINO IR) is served when
given, else the ONNX graph.

Every ``config.pbtxt`` is rendered from, and re-parsed into, Triton's own ``inference.ModelConfig``
protobuf (``model_config_pb2`` shipped with the ``tritonclient`` package), so a field Triton does
not know cannot be written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from nasforge.atomic import temp_dir_beside
from nasforge.errors import ConfigError, ModelFileError
from nasforge.runtimes.registry import get_runtime, list_runtimes

#: Runtimes Triton serves.
BACKENDS = tuple(r.name for r in list_runtimes() if r.triton is not None)
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    7: "TYPE_INT64",
    6: "TYPE_INT32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
}


def model_config_module() -> ModuleType:
    """Triton's ``model_config_pb2`` from ``tritonclient``, loaded without its gRPC package.

    Raises:
        ConfigError: ``tritonclient`` is not installed.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("Triton export needs the tritonclient package (pip install tritonclient)")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    # tritonclient.grpc's __init__ imports grpcio; the generated protobuf module needs only
    # protobuf, so load the file on its own.
    mspec = importlib.util.spec_from_file_location("nasforge_triton_model_config_pb2", path)
    if mspec is None or mspec.loader is None:
        raise ConfigError(f"cannot load Triton's model config schema from {path}")
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TensorSig:
    """Name, Triton data type and per-sample dims of one model input or output."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _onnx_signature(path: Path) -> tuple[TensorSig, TensorSig]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ModelFileError(f"cannot read ONNX model {path}: {e}") from e
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    sigs = []
    for vi in (inputs[0], model.graph.output[0]):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
            raise ModelFileError(f"{path}: tensor {vi.name} has shape {dims}; need [batch, static]")
        dtype = _ONNX_TO_TRITON.get(tt.elem_type)
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {vi.name} has unsupported type {tt.elem_type}")
        sigs.append(TensorSig(vi.name, dtype, tuple(dims[1:])))
    return sigs[0], sigs[1]


def build_config(
    name: str,
    backend: str,
    inp: TensorSig,
    out: TensorSig,
    max_batch_size: int,
    max_queue_delay_ms: float,
    preferred_batch_sizes: list[int],
    instances: int = 1,
) -> Any:
    """The ``inference.ModelConfig`` message of one Triton model.

    Raises:
        ConfigError: Unknown backend or inconsistent batching settings.
    """
    runtimes = {r.name: r for r in list_runtimes() if r.triton is not None}
    if backend not in runtimes:
        raise ConfigError(f"unknown Triton backend {backend!r}; choose from {list(runtimes)}")
    triton = runtimes[backend].triton
    assert triton is not None
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if any(b < 1 or b > max_batch_size for b in preferred_batch_sizes):
        raise ConfigError(
            f"preferred batch sizes {preferred_batch_sizes} not in 1..{max_batch_size}"
        )
    pb = model_config_module()
    cfg = pb.ModelConfig(name=name, backend=triton.backend, max_batch_size=max_batch_size)
    for sig, field in ((inp, cfg.input), (out, cfg.output)):
        t = field.add()
        t.name = sig.name
        t.data_type = pb.DataType.Value(sig.data_type)
        t.dims.extend(sig.dims)
    cfg.dynamic_batching.max_queue_delay_microseconds = int(round(max_queue_delay_ms * 1000))
    cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    group = cfg.instance_group.add()
    group.count = instances
    group.kind = pb.ModelInstanceGroup.KIND_GPU if triton.gpu else pb.ModelInstanceGroup.KIND_CPU
    if triton.accelerator is not None:
        accelerators = cfg.optimization.execution_accelerators
        acc = (
            accelerators.gpu_execution_accelerator
            if triton.gpu
            else accelerators.cpu_execution_accelerator
        ).add()
        acc.name = triton.accelerator["name"]
        for key, value in triton.accelerator.get("parameters", {}).items():
            acc.parameters[key] = str(value)
    return cfg


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` (unknown fields raise)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_module().ModelConfig())


def export_triton_repository(
    onnx_model: Path | str,
    output: Path | str,
    name: str,
    backends: tuple[str, ...] = BACKENDS,
    runtime_files: Mapping[str, Path | str] | None = None,
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 5.0,
    preferred_batch_sizes: list[int] | None = None,
) -> Path:
    """Write a Triton model repository for one model (atomically: temp folder, then rename).

    Args:
        onnx_model: The ONNX model (dynamic batch, static per-sample shape).
        output: Repository folder to create; must not exist yet.
        name: Model name prefix; each runtime becomes model ``<name>-<runtime>``.
        backends: Runtimes to serve, any of :data:`BACKENDS` (``"onnxruntime"``,
            ``"openvino"``, ``"tensorrt"``).
        runtime_files: A runtime's own model file to serve instead of the ONNX graph, by
            runtime name (e.g. ``{"openvino": "openvino/fp32.xml"}``, its ``.bin`` beside it).
        max_batch_size: Triton ``max_batch_size``.
        max_queue_delay_ms: Dynamic batching ``max_queue_delay_microseconds`` / 1000.
        preferred_batch_sizes: Default: powers of two up to ``max_batch_size``.

    Returns:
        The repository path.

    Raises:
        ModelFileError: Missing or unreadable model files.
        ConfigError: Bad names, backends or batching settings, or ``output`` exists.
    """
    onnx_model = Path(onnx_model)
    output = Path(output)
    if not onnx_model.is_file():
        raise ModelFileError(f"ONNX model not found: {onnx_model}")
    if output.exists():
        raise ConfigError(f"output {output} already exists; choose a new folder")
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ConfigError(f"model name {name!r} must be letters, digits, '-' or '_'")
    inp, out = _onnx_signature(onnx_model)
    if preferred_batch_sizes is None:
        preferred_batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= max_batch_size]
    tmp = temp_dir_beside(output)  # a normal folder's mode, not mkdtemp's 0700
    try:
        for backend in backends:
            model_name = f"{name}-{backend}"
            vdir = tmp / model_name / "1"
            vdir.mkdir(parents=True)
            b_inp, b_out = inp, out
            own = (runtime_files or {}).get(backend)
            if own is not None:
                runtime = get_runtime(backend)
                files = runtime.model_files(Path(own))
                if not all(f.is_file() for f in files):
                    raise ModelFileError(f"{runtime.file_kind} {own} or its companion is missing")
                for f in files:
                    shutil.copy2(f, vdir / f"model{f.suffix}")
                in_name, out_name = runtime.io_names(Path(own))
                b_inp = TensorSig(in_name, inp.data_type, inp.dims)
                b_out = TensorSig(out_name, out.data_type, out.dims)
            else:
                shutil.copy2(onnx_model, vdir / "model.onnx")
            cfg = build_config(
                model_name,
                backend,
                b_inp,
                b_out,
                max_batch_size,
                max_queue_delay_ms,
                preferred_batch_sizes,
            )
            default = get_runtime(backend).triton.default_file  # type: ignore[union-attr]
            if own is None and default != "model.onnx":
                # A backend that reads another format by default (OpenVINO: model.xml) is
                # pointed at the ONNX graph.
                cfg.default_model_filename = "model.onnx"
            from google.protobuf import text_format

            (tmp / model_name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
