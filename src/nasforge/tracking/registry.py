"""Model registry: register a target's best model and move ``champion-<target>`` only if it wins.

The gate compares the challenger with the model the alias points at, on evidence stored as tags
of each model version (test accuracy of the exported model, latency p50 at batch 1, size), so the
comparison needs no artifact download and survives across runs and machines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nasforge.tracking.mlflow_runs import client

ACC_TAG = "nasforge.test_accuracy"
LAT_TAG = "nasforge.latency_p50_ms"
SIZE_TAG = "nasforge.size_bytes"
# One test sample is worth more than this on any split under a million samples, so a smaller
# difference is rounding (e.g. of evidence tags written with 6 decimals).
ACC_EPS = 1e-6


def alias_for(target: str) -> str:
    """The champion alias of a target (registry aliases allow letters, digits, '-' and '_')."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in target)
    return f"champion-{safe}"


@dataclass
class Challenger:
    """The model proposed for a target and its measured evidence."""

    target: str
    files: Path
    accuracy: float
    latency_p50_ms: float
    size_bytes: int
    precision: str
    candidate: str
    arch_str: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    """What promotion did for one target, and why."""

    target: str
    model_name: str
    alias: str
    version: str | None
    promoted: bool
    reason: str
    incumbent_version: str | None = None
    incumbent: dict[str, float] | None = None
    challenger: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def beats(
    challenger: Challenger, incumbent: dict[str, float], acc_tol: float, lat_tol: float
) -> tuple[bool, str]:
    """Gate: is the challenger better than the incumbent?

    Better means higher accuracy without being more than ``lat_tol`` slower, or accuracy within
    ``acc_tol`` while more than ``lat_tol`` faster. Anything else keeps the incumbent, so a rerun
    that reproduces the same model (equal accuracy, latency within noise) never moves the alias.

    Returns:
        The verdict and a one-sentence reason.
    """
    acc, inc_acc = challenger.accuracy, incumbent["accuracy"]
    lat, inc_lat = challenger.latency_p50_ms, incumbent["latency_p50_ms"]
    # Accuracies are fractions of one test split: equal counts must compare equal even after a
    # round trip through registry tags, so "higher" means higher by more than float noise.
    if acc > inc_acc + ACC_EPS and lat <= inc_lat * (1 + lat_tol):
        return True, (
            f"accuracy {acc:.4f} > champion {inc_acc:.4f} at latency {lat:.3f} ms "
            f"(champion {inc_lat:.3f} ms, tolerance {lat_tol:.0%})"
        )
    if acc >= inc_acc - acc_tol and lat < inc_lat * (1 - lat_tol):
        return True, (
            f"latency {lat:.3f} ms is over {lat_tol:.0%} faster than champion {inc_lat:.3f} ms "
            f"at accuracy {acc:.4f} (champion {inc_acc:.4f}, tolerance {acc_tol})"
        )
    return False, (
        f"kept champion: challenger accuracy {acc:.4f} vs {inc_acc:.4f}, latency {lat:.3f} ms vs "
        f"{inc_lat:.3f} ms; it must be more accurate without being >{lat_tol:.0%} slower, or "
        f">{lat_tol:.0%} faster within {acc_tol} accuracy"
    )


def _incumbent(c, name: str, alias: str) -> tuple[str | None, dict[str, float] | None]:
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the alias is unset
        return None, None
    try:
        evidence = {
            "accuracy": float(mv.tags[ACC_TAG]),
            "latency_p50_ms": float(mv.tags[LAT_TAG]),
            "size_bytes": float(mv.tags.get(SIZE_TAG, "nan")),
        }
    except (KeyError, ValueError):
        evidence = None
    return str(mv.version), evidence


def register_and_promote(
    uri: str,
    run_id: str,
    model_name: str,
    challenger: Challenger,
    acc_tol: float,
    lat_tol: float,
) -> Decision:
    """Register ``challenger`` as a new version of ``model_name``; move the alias if it wins.

    The model files are uploaded to run ``run_id`` under ``models/<target>`` and the version's
    source points there.
    """
    c = client(uri)
    alias = alias_for(challenger.target)
    # One folder per registered model, so versions from one run never overwrite each other.
    target_dir = alias.removeprefix("champion-")
    artifact_path = f"models/{target_dir}/{challenger.candidate}-{challenger.precision}"
    c.log_artifacts(run_id, str(challenger.files), artifact_path)
    try:
        c.create_registered_model(
            model_name, description=f"nasforge models for {challenger.target}"
        )
    except Exception:  # noqa: BLE001 - already exists
        pass
    tags = {
        ACC_TAG: repr(float(challenger.accuracy)),
        LAT_TAG: repr(float(challenger.latency_p50_ms)),
        SIZE_TAG: str(challenger.size_bytes),
        "nasforge.target": challenger.target,
        "nasforge.precision": challenger.precision,
        "nasforge.candidate": challenger.candidate,
        "nasforge.arch_str": challenger.arch_str,
        **challenger.tags,
    }
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    inc_version, incumbent = _incumbent(c, model_name, alias)
    if inc_version is None:
        promoted, reason = True, "no champion yet"
    elif incumbent is None:
        promoted, reason = True, f"champion v{inc_version} has no recorded evidence"
    else:
        promoted, reason = beats(challenger, incumbent, acc_tol, lat_tol)
    if promoted:
        c.set_registered_model_alias(model_name, alias, mv.version)
    c.set_model_version_tag(
        model_name, mv.version, "nasforge.decision", "promoted" if promoted else "kept-incumbent"
    )
    c.set_model_version_tag(model_name, mv.version, "nasforge.reason", reason)
    return Decision(
        target=challenger.target,
        model_name=model_name,
        alias=alias,
        version=str(mv.version),
        promoted=promoted,
        reason=reason,
        incumbent_version=inc_version,
        incumbent=incumbent,
        challenger={
            "accuracy": challenger.accuracy,
            "latency_p50_ms": challenger.latency_p50_ms,
            "size_bytes": challenger.size_bytes,
            "precision": challenger.precision,
            "candidate": challenger.candidate,
            "arch_str": challenger.arch_str,
        },
    )
