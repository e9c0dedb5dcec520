"""KServe ``InferenceService`` manifest that serves a Triton model repository.

The manifest uses KServe's v1beta1 model spec (``modelFormat: triton``, runtime
``kserve-tritonserver``, Open Inference Protocol v2) with the repository at ``storage_uri``
(``s3://``, ``gs://``, ``pvc://`` ...), which is the folder written by
:func:`nasforge.serve.triton.export_triton_repository`.

:data:`INFERENCESERVICE_SUBSET_SCHEMA` is a hand-written JSON Schema of the part of the
InferenceService CRD this module writes (required fields, types, name and quantity formats,
no unknown keys). It is *not* the CRD's full OpenAPI schema, which no installed package ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nasforge.atomic import atomic_file
from nasforge.errors import ConfigError

_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"
_STORAGE = r"^(s3|gs|pvc|https?|oci|hdfs|webhdfs|azure)://.+"

_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        k: {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "patternProperties": {
                r"^(cpu|memory|nvidia\.com/gpu)$": {"type": "string", "pattern": _QUANTITY}
            },
        }
        for k in ("requests", "limits")
    },
    "required": ["requests", "limits"],
}

INFERENCESERVICE_SUBSET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": _DNS1123, "maxLength": 63},
                "namespace": {"type": "string", "pattern": _DNS1123, "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["predictor"],
            "properties": {
                "predictor": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["model"],
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "model": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["modelFormat", "storageUri", "protocolVersion"],
                            "properties": {
                                "modelFormat": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"const": "triton"},
                                        "version": {"type": "string"},
                                    },
                                },
                                "runtime": {"type": "string", "pattern": _DNS1123},
                                "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                                "storageUri": {"type": "string", "pattern": _STORAGE},
                                "args": {"type": "array", "items": {"type": "string"}},
                                "resources": _RESOURCES,
                            },
                        },
                    },
                },
            },
        },
    },
}


def inference_service(
    name: str,
    storage_uri: str,
    namespace: str | None = None,
    gpu: bool = False,
    cpu: str = "2",
    memory: str = "4Gi",
    min_replicas: int = 1,
    max_replicas: int = 1,
) -> dict[str, Any]:
    """The InferenceService manifest as a dict.

    Args:
        name: Service name (DNS-1123 label).
        storage_uri: Where the Triton repository is stored (``s3://bucket/repo``, ``pvc://...``).
        namespace: Kubernetes namespace; omitted = the one applied to.
        gpu: Request one NVIDIA GPU (for the ``tensorrt`` models).
        cpu: CPU request and limit (Kubernetes quantity).
        memory: Memory request and limit.
        min_replicas: Fewest replicas.
        max_replicas: Most replicas.

    Raises:
        ConfigError: The manifest would not validate (bad name, URI, quantities, replicas).
    """
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu, "memory": memory},
    }
    if gpu:
        resources["limits"]["nvidia.com/gpu"] = "1"
        resources["requests"]["nvidia.com/gpu"] = "1"
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "nasforge"}}
    if namespace:
        metadata["namespace"] = namespace
    doc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {
            "predictor": {
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "model": {
                    "modelFormat": {"name": "triton"},
                    "runtime": "kserve-tritonserver",
                    "protocolVersion": "v2",
                    "storageUri": storage_uri,
                    # Configs are exported complete; Triton must not auto-complete them.
                    "args": ["--strict-model-config=true"],
                    "resources": resources,
                },
            }
        },
    }
    validate_inference_service(doc)
    return doc


def validate_inference_service(doc: dict[str, Any]) -> None:
    """Check a manifest against :data:`INFERENCESERVICE_SUBSET_SCHEMA` and replica bounds.

    Raises:
        ConfigError: One line naming the first violation.
    """
    import jsonschema

    try:
        jsonschema.validate(doc, INFERENCESERVICE_SUBSET_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise ConfigError(f"InferenceService invalid at {where}: {e.message}") from None
    pred = doc["spec"]["predictor"]
    if pred.get("minReplicas", 0) > pred.get("maxReplicas", 1 << 30):
        raise ConfigError("InferenceService invalid: minReplicas > maxReplicas")


def write_inference_service(doc: dict[str, Any], path: Path | str) -> Path:
    """Validate and write the manifest as YAML (temp file, then rename)."""
    validate_inference_service(doc)
    path = Path(path)
    with atomic_file(path, suffix=".yaml") as tmp:  # a normal file's mode, not mkstemp's 0600
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
