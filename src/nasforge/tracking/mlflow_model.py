"""Registered versions as MLflow models.

Each version is an MLflow model with the ONNX flavour (``mlflow.onnx.log_model``): the exported
ONNX graph of the promoted precision, a signature (the model's input tensor, batch dimension free,
and its named outputs) and an input example, so ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` run it with ONNX Runtime. The files the target itself loads when they are
not that ONNX graph (the OpenVINO IR ``.xml`` + ``.bin``) go alongside as the flavour's extra
files (``extra_files/``). The input example is a standard-normal batch: the model's contract is an
already normalised input (see README, Serving).

A version is identified by the SHA-256 of its source files (:func:`content_sha256`), recorded on
the version, so an artifact identical to one already registered is recognised without a download.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.errors import ModelFileError, TrackingError

MODEL_ONNX = "model.onnx"
EXTRA_DIR = "extra_files"
#: ONNX protobufs above ~2 GB need external data; below it one self-contained file is simpler to
#: serve and to compare.
_EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """The files of one challenger.

    Attributes:
        onnx: The ONNX graph logged with the ONNX flavour.
        runtime_file: The file the target's runtime loads (the ``.onnx`` or an IR ``.xml``).
        extras: Files logged alongside the flavour (all but ``onnx``).
    """

    onnx: Path
    runtime_file: Path
    extras: tuple[Path, ...]


def model_files_for(folder: Path, runtime: str) -> ModelFiles:
    """Split a benchmark ``model/<precision>/`` folder into flavour, runtime file and extras
    (the runtime file is the one the runtime loads, by its preferred suffixes).

    Raises:
        ModelFileError: No ONNX graph in the folder, or no file the runtime can load.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"model folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    onnx_files = [p for p in files if p.suffix == ".onnx"]
    if not onnx_files:
        raise ModelFileError(
            f"{folder} has no ONNX graph to register as an MLflow model (benchmark output from "
            "before ONNX was kept beside the runtime's files? run the benchmark stage again)"
        )
    from nasforge.runtimes.registry import get_runtime

    runtime_file = get_runtime(runtime).pick_file(files) or onnx_files[0]
    extras = tuple(p for p in files if p != onnx_files[0])
    return ModelFiles(onnx_files[0], runtime_file, extras)


def content_sha256(folder: Path) -> str:
    """SHA-256 over the files of a model folder (relative names and contents, sorted)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                fh.update(chunk)
        h.update(fh.digest())
    return h.hexdigest()


def use_uri(uri: str) -> None:
    """Point MLflow's process-wide tracking and registry URIs at ``uri``.

    ``mlflow.<flavor>.log_model`` and ``models:/`` downloads read these globals rather than a
    client's URI; a nasforge process talks to one store, so setting them is safe.
    """
    import mlflow

    from nasforge.tracking.mlflow_runs import client

    client(uri)  # quiets MLflow's logging first
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    if mlflow.get_registry_uri() != uri:
        mlflow.set_registry_uri(uri)


def _input_example(model: Any) -> np.ndarray:
    """A standard-normal batch of 2 in the model's input shape and dtype."""
    from onnx.helper import tensor_dtype_to_np_dtype

    inp = model.graph.input[0]
    t = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if not dims or any(d is None or d <= 0 for d in dims[1:]):
        raise ModelFileError(
            f"ONNX input {inp.name!r} has shape {dims}: not static beyond the batch dimension"
        )
    dtype = tensor_dtype_to_np_dtype(t.elem_type)
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, *dims[1:])).astype(dtype)


def signature_and_example(onnx_path: Path) -> tuple[Any, np.ndarray]:
    """The MLflow signature of an ONNX file (from a real run of it) and its input example."""
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    example = _input_example(onnx.load(str(onnx_path), load_external_data=False))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outputs = sess.run(names, {sess.get_inputs()[0].name: example})
    return infer_signature(example, dict(zip(names, outputs, strict=True))), example


def log_onnx_model(
    uri: str,
    run_id: str,
    name: str,
    files: ModelFiles,
    device: str,
    threads: int,
    metadata: dict[str, Any],
) -> tuple[str, str]:
    """Log ``files`` as an MLflow ONNX model of run ``run_id``; return ``(model_uri, model_id)``.

    The logged model lives in the run's experiment and is an output of the run (the runs table's
    Models column).

    Raises:
        ModelFileError: The ONNX graph cannot be loaded or run.
        TrackingError: The tracking store refuses the model.
    """
    import mlflow
    import onnx
    import onnxruntime as ort

    from nasforge.runtimes.onnxruntime import PROVIDERS
    from nasforge.tracking.mlflow_runs import client

    c = client(uri)
    try:
        signature, example = signature_and_example(files.onnx)
        proto = onnx.load(str(files.onnx))
    except ModelFileError:
        raise
    except Exception as err:  # noqa: BLE001 - onnx / ORT raise many types for a bad file
        raise ModelFileError(f"cannot load {files.onnx} as an ONNX model: {err}") from err
    use_uri(uri)
    try:
        run = c.get_run(run_id)
        logged = c.create_logged_model(
            experiment_id=run.info.experiment_id, name=name, source_run_id=run_id
        )
        info = mlflow.onnx.log_model(
            proto,
            name=name,
            model_id=logged.model_id,
            run_id=run_id,
            signature=signature,
            input_example=example,
            metadata={"nasforge": metadata},
            extra_files=[str(p) for p in files.extras] or None,
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"onnx=={onnx.__version__}",
                f"onnxruntime=={ort.__version__}",
                f"numpy=={np.__version__}",
            ],
            # the ONNX flavour runs in ONNX Runtime: its execution providers for the device
            onnx_execution_providers=PROVIDERS.get(device, PROVIDERS["cpu"]),
            onnx_session_options={
                "intra_op_num_threads": int(threads),
                "inter_op_num_threads": 1,
                "execution_mode": "sequential",
            },
            save_as_external_data=proto.ByteSize() > _EXTERNAL_DATA_BYTES,
        )
    except Exception as err:  # noqa: BLE001 - REST, DB and artifact-store errors
        raise TrackingError(f"cannot log the MLflow model {name}: {_first_line(err)}") from err
    return info.model_uri, logged.model_id


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def download_version(uri: str, model_name: str, version: str, dest: Path) -> Path:
    """Download a registered version's files into ``dest``; return the local folder.

    Raises:
        TrackingError: The version's artifacts cannot be downloaded.
    """
    import mlflow

    use_uri(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dest)
            )
        )
    except Exception as err:  # noqa: BLE001 - REST, DB and artifact-store errors
        raise TrackingError(f"cannot download {model_name} v{version}: {_first_line(err)}") from err


def runtime_file_in(local: Path, runtime: str) -> Path | None:
    """The file a runtime loads from a downloaded version (MLflow model or a plain folder).

    By the runtime's preferred suffixes: OpenVINO its IR (in ``extra_files/`` of an MLflow
    model) else ONNX, ExecuTorch its ``.pte``; an ONNX graph is the flavour's ``model.onnx`` (or
    the one ``.onnx`` of a plain folder).
    """
    from nasforge.runtimes.registry import get_runtime

    local = Path(local)
    for suffix in get_runtime(runtime).suffixes:
        if suffix == ".onnx" and (local / MODEL_ONNX).is_file():
            return local / MODEL_ONNX
        found = sorted(local.rglob(f"*{suffix}"))
        if found:
            return found[0]
    return None
