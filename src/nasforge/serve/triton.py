"""Export a Triton Inference Server model repository with dynamic batching per backend.

One Triton model per backend, named ``<name>-<backend>``::

    <repo>/<name>-onnxruntime/config.pbtxt   1/model.onnx
    <repo>/<name>-openvino/config.pbtxt      1/model.xml 1/model.bin
    <repo>/<name>-tensorrt/config.pbtxt      1/model.onnx

``tensorrt`` is the ONNX Runtime backend with TensorRT as GPU execution accelerator (Triton
builds the engine on the GPU it runs on), so no TensorRT plan has to be built on a machine with
the same GPU beforehand.

Every ``config.pbtxt`` is rendered from, and re-parsed into, Triton's own ``inference.ModelConfig``
protobuf (``model_config_pb2`` shipped with the ``tritonclient`` package), so a field Triton does
not know cannot be written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from nasforge.errors import ConfigError, ModelFileError

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
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


def _openvino_names(xml: Path) -> tuple[str, str]:
    import openvino as ov

    try:
        m = ov.Core().read_model(str(xml))
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"cannot read OpenVINO IR {xml}: {e}") from e
    return m.inputs[0].get_any_name(), m.outputs[0].get_any_name()


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
    if backend not in BACKENDS:
        raise ConfigError(f"unknown Triton backend {backend!r}; choose from {list(BACKENDS)}")
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if any(b < 1 or b > max_batch_size for b in preferred_batch_sizes):
        raise ConfigError(
            f"preferred batch sizes {preferred_batch_sizes} not in 1..{max_batch_size}"
        )
    pb = model_config_module()
    cfg = pb.ModelConfig(
        name=name,
        backend="openvino" if backend == "openvino" else "onnxruntime",
        max_batch_size=max_batch_size,
    )
    for sig, field in ((inp, cfg.input), (out, cfg.output)):
        t = field.add()
        t.name = sig.name
        t.data_type = pb.DataType.Value(sig.data_type)
        t.dims.extend(sig.dims)
    cfg.dynamic_batching.max_queue_delay_microseconds = int(round(max_queue_delay_ms * 1000))
    cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    group = cfg.instance_group.add()
    group.count = instances
    if backend == "tensorrt":
        group.kind = pb.ModelInstanceGroup.KIND_GPU
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        acc.name = "tensorrt"
        acc.parameters["precision_mode"] = "FP32"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    else:
        group.kind = pb.ModelInstanceGroup.KIND_CPU
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
    openvino_xml: Path | str | None = None,
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 5.0,
    preferred_batch_sizes: list[int] | None = None,
) -> Path:
    """Write a Triton model repository for one model (atomically: temp folder, then rename).

    Args:
        onnx_model: The ONNX model (dynamic batch, static per-sample shape).
        output: Repository folder to create; must not exist yet.
        name: Model name prefix; each backend becomes model ``<name>-<backend>``.
        backends: Any of ``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``.
        openvino_xml: OpenVINO IR for the ``openvino`` backend (its ``.bin`` beside it);
            without it the ONNX file is served by the OpenVINO backend.
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
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for backend in backends:
            model_name = f"{name}-{backend}"
            vdir = tmp / model_name / "1"
            vdir.mkdir(parents=True)
            b_inp, b_out = inp, out
            if backend == "openvino" and openvino_xml is not None:
                xml = Path(openvino_xml)
                if not xml.is_file() or not xml.with_suffix(".bin").is_file():
                    raise ModelFileError(f"OpenVINO IR {xml} or its .bin is missing")
                shutil.copy2(xml, vdir / "model.xml")
                shutil.copy2(xml.with_suffix(".bin"), vdir / "model.bin")
                in_name, out_name = _openvino_names(xml)
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
            if backend == "openvino" and openvino_xml is None:
                # The OpenVINO backend looks for model.xml unless told otherwise.
                cfg.default_model_filename = "model.onnx"
            from google.protobuf import text_format

            (tmp / model_name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
