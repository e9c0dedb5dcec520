"""Find the models a server holds for a target: from a folder or from the MLflow registry.

A *variant* is one servable model file of the target's runtime and precision plus what is known
about it (accuracy, size). Folders accepted (searched recursively, so a parent of many candidate
folders gives one variant per candidate):

* a benchmark output ``<candidate>/benchmark.json`` + ``<candidate>/model/<precision>/``;
* an export folder with ``export.json`` (``fp32.onnx``, ``int8.onnx``, ``openvino/*.xml``,
  ``executorch/*.pte``: each runtime's files where its layout puts them);
* an early-exit folder with ``early_exit.json`` (staged ONNX graphs + ``thresholds.json``, see
  :mod:`nasforge.space.early_exit`): one variant of kind ``"early_exit"`` (FP32 targets only).

Copies of one model (a pipeline run holds the export, each target's benchmark copy and the copy
``collect`` gathered) are one variant: models are told apart by the content hash of their files.

From the registry, every version of ``nasforge-<target>`` is a variant; the one behind alias
``champion-<target>`` is marked as champion.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from nasforge.artifacts.benchmark_report import find_reports, model_dir
from nasforge.artifacts.export_bundle import ExportBundle, find_bundles, onnx_twin, runtime_file
from nasforge.errors import ModelFileError, TargetError, TrackingError
from nasforge.hardware.targets import get_target
from nasforge.runtimes.base import Runtime
from nasforge.runtimes.registry import bundle_runtime, companion_files
from nasforge.space.early_exit import MANIFEST as EARLY_EXIT_MANIFEST


@dataclasses.dataclass
class VariantSpec:
    """One servable model.

    Attributes:
        name: Unique display name (candidate or registry version).
        path: Model file (``.onnx`` or OpenVINO ``.xml``), or the ``early_exit.json`` of a
            staged early-exit folder.
        accuracy: Test accuracy of the exported model if recorded, else ``None``.
        size_bytes: Bytes of the model files (memory estimate for the budget).
        champion: True for the registry champion.
        kind: ``"model"`` (one graph) or ``"early_exit"`` (staged graphs, exits early).
    """

    name: str
    path: Path
    accuracy: float | None
    size_bytes: int
    champion: bool = False
    kind: str = "model"


def _runtime_precision(target: str) -> tuple[Runtime, str]:
    """The runtime whose bundle files serve ``target``, and the target's precision."""
    t = get_target(target)
    if t.kind != "runtime":
        raise TargetError(f"target '{target}' is a latency table; it cannot serve models")
    return bundle_runtime(t.backend), t.precision


def _model_size(path: Path) -> int:
    return sum(f.stat().st_size for f in companion_files(path) if f.is_file())


def _pick_file(folder: Path, runtime: Runtime) -> Path | None:
    # A runtime may read several formats (OpenVINO: its IR, else ONNX), preferred first.
    if not folder.is_dir():
        return None
    return runtime.pick_file([f for f in folder.iterdir() if f.is_file()])


def _content_hash(path: Path) -> str:
    """SHA-256 of a model's files (an OpenVINO IR is its ``.xml`` and ``.bin``)."""
    h = hashlib.sha256()
    for f in companion_files(path):
        if f.is_file():
            with f.open("rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _twin_aliases(root: Path, runtime: Runtime, precision: str) -> dict[str, str]:
    """Content hash of each export's ONNX twin -> hash of the runtime's own file of the same
    model, so an ONNX copy (which OpenVINO also reads) and the IR converted from it count as
    one model."""
    if ".onnx" not in runtime.suffixes:
        return {}
    out = {}
    for bundle in find_bundles([root]):
        onnx = onnx_twin(bundle, runtime, precision)
        own = runtime_file(bundle, runtime, precision)
        if onnx.is_file() and own.is_file() and onnx != own:
            out[_content_hash(onnx)] = _content_hash(own)
    return out


def variants_from_dir(root: Path | str, target: str) -> list[VariantSpec]:
    """Variants of ``target`` found below ``root``: one per distinct model.

    A pipeline run folder holds each model several times (the export, the benchmark copy of
    each target, the copy gathered by ``collect``), so copies are told apart by the content
    hash of their model files and each model is served once. Of its copies the one kept is a
    benchmark measured on ``target``, else another benchmark, else the export: a benchmark
    carries the model's measured accuracy.

    Raises:
        ModelFileError: ``root`` is missing or holds no model for the target.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelFileError(f"model folder not found: {root}")
    runtime, precision = _runtime_precision(target)
    found: list[tuple[int, VariantSpec]] = []  # (preference, lower first; spec)
    seen: set[Path] = set()
    for folder, report in find_reports([root], required=False):
        path = _pick_file(model_dir(folder, precision), runtime)
        if path is None:
            continue
        acc = report.results.get(precision, {}).get("test_accuracy")
        name = report.candidate or folder.name
        rank = 0 if report.target_name == target else 1
        found.append((rank, VariantSpec(name, path, acc, _model_size(path))))
        seen.add(folder.resolve())
    for folder in find_bundles([root]):
        if folder.resolve() in seen:
            continue
        path = runtime_file(folder, runtime, precision)
        if not path.is_file():
            continue
        name = ExportBundle.read(folder).candidate or folder.name
        found.append((2, VariantSpec(name, path, None, _model_size(path))))
    if precision == "fp32" and ".onnx" in runtime.suffixes:  # staged graphs: FP32 ONNX
        found.extend((0, v) for v in _early_exit_variants(root))
    if not found:
        raise ModelFileError(
            f"no {precision} {runtime.name} model below {root} "
            "(expected benchmark, export or early-exit folders)"
        )
    out = _one_per_model(found, _twin_aliases(root, runtime, precision))
    names = [v.name for v in out]
    for i, v in enumerate(out):
        if names.count(v.name) > 1:  # different models of one candidate name: keep names unique
            v.name = f"{v.name}#{i}"
    return out


def _one_per_model(
    found: list[tuple[int, VariantSpec]], aliases: dict[str, str]
) -> list[VariantSpec]:
    """The preferred copy of each distinct model, in order of first appearance; a copy without
    an accuracy takes one recorded by another copy of the same model."""
    groups: dict[str, list[tuple[int, VariantSpec]]] = {}
    for rank, spec in found:
        if spec.kind == "early_exit":
            key = "early_exit:" + _staged_hash(spec.path)
        else:
            h = _content_hash(spec.path)
            key = aliases.get(h, h) if spec.path.suffix == ".onnx" else h
        groups.setdefault(key, []).append((rank, spec))
    out = []
    for copies in groups.values():
        best = min(copies, key=lambda c: c[0])[1]  # min() keeps the first of equal ranks
        if best.accuracy is None:
            best.accuracy = next((s.accuracy for _, s in copies if s.accuracy is not None), None)
        out.append(best)
    return out


def _staged_hash(manifest: Path) -> str:
    """Content hash of an early-exit folder: its manifest, thresholds and stage graphs."""
    h = hashlib.sha256()
    for f in sorted(manifest.parent.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + _content_hash(f).encode())
    return h.hexdigest()


def _early_exit_variants(root: Path) -> list[VariantSpec]:
    from nasforge.serve.early_exit import load_manifest

    out = []
    for mj in sorted(root.rglob(EARLY_EXIT_MANIFEST)):
        man, _ = load_manifest(mj.parent)  # clean error on a broken folder, before serving
        size = sum((mj.parent / s).stat().st_size for s in man["stages"])
        acc = man.get("test_accuracy")
        name = str(man.get("candidate", mj.parent.name))
        out.append(
            VariantSpec(name, mj, float(acc) if acc is not None else None, size, kind="early_exit")
        )
    return out


def variants_from_registry(
    tracking_uri: str, target: str, cache_dir: Path | str, model_prefix: str = "nasforge"
) -> list[VariantSpec]:
    """Variants of ``target`` from the MLflow registry, champion marked.

    Every registered version of ``<model_prefix>-<target>`` is downloaded to ``cache_dir``; the
    target's runtime loads the version's IR (OpenVINO, from the MLflow model's extra files) or
    its ONNX graph.

    Raises:
        TrackingError: Registry unreachable or the model is not registered.
        ModelFileError: A version has no model file for the target's runtime.
    """
    from nasforge.tracking.mlflow_model import download_version, runtime_file_in
    from nasforge.tracking.mlflow_runs import client
    from nasforge.tracking.registry import ACC_TAG, SIZE_TAG, alias_for, model_name_for

    runtime, _ = _runtime_precision(target)
    name = model_name_for(model_prefix, target)
    c = client(tracking_uri)
    try:
        versions: list[Any] = list(c.search_model_versions(f"name='{name}'"))
    except Exception as e:  # noqa: BLE001 - MLflow raises several REST/DB errors
        raise TrackingError(f"cannot list versions of {name} at {tracking_uri}: {e}") from e
    if not versions:
        raise TrackingError(f"no registered versions of model {name} at {tracking_uri}")
    try:
        champion = str(c.get_model_version_by_alias(name, alias_for(target)).version)
    except Exception:  # noqa: BLE001 - alias unset
        champion = None
    out = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        # A version is an MLflow ONNX model with the runtime's own files (OpenVINO IR) in its
        # extra_files/, or, registered by an older nasforge, a plain folder of model files.
        local = download_version(
            tracking_uri, name, str(mv.version), Path(cache_dir) / name / str(mv.version)
        )
        path = runtime_file_in(local, runtime.name)
        if path is None:
            raise ModelFileError(
                f"{name} v{mv.version} has no {runtime.name} model file in {local}"
            )
        acc = mv.tags.get(ACC_TAG)
        size = mv.tags.get(SIZE_TAG)
        out.append(
            VariantSpec(
                name=f"{name}/v{mv.version}",
                path=path,
                accuracy=float(acc) if acc is not None else None,
                size_bytes=int(size) if size is not None else _model_size(path),
                champion=str(mv.version) == champion,
            )
        )
    return out
