"""Model registry: register a target's best model and move ``champion-<target>`` only if it wins.

The gate compares the challenger with the model the alias points at, on evidence stored as tags
of each model version (test accuracy of the exported model, latency p50 at batch 1, size), so the
comparison needs no artifact download and survives across runs and machines.

Concurrent promotions. MLflow has no compare-and-set for aliases, so two promoters that each read
the champion, win against it and write the alias could leave the *worse* of the two as champion.
Instead, the champion is a function of the registry's content: the gate applied in version order
(v1 is champion, each later version replaces the champion if it beats it), skipping versions
without evidence and versions rolled back. Every promoter registers its version first, then
settles the alias on that function and re-reads until the alias and the set of versions it was
computed from are both unchanged (a write that loses a race with another promoter's write is
retried), so whichever promoter writes last writes the answer all of them
agree on: one consistent champion, whatever the interleaving. Rolling back marks the champion
``nasforge.rolled_back`` and settles again, which restores the previous champion.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from nasforge.errors import TrackingError
from nasforge.tracking.mlflow_runs import client

ACC_TAG = "nasforge.test_accuracy"
LAT_TAG = "nasforge.latency_p50_ms"
SIZE_TAG = "nasforge.size_bytes"
ROLLED_BACK_TAG = "nasforge.rolled_back"
#: Settling re-reads the registry until nothing changed between two reads; each round is a few
#: requests, and only promoters registering at the same moment make it take more than one.
SETTLE_ROUNDS = 20
# One test sample is worth more than this on any split under a million samples, so a smaller
# difference is rounding (e.g. of evidence tags written with 6 decimals).
ACC_EPS = 1e-6


def model_name_for(prefix: str, target: str) -> str:
    """The registered model of a target (one per target, so each has its own versions)."""
    return f"{prefix}-{target}".replace(":", "-")


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
    challenger: Any, incumbent: dict[str, float], acc_tol: float, lat_tol: float
) -> tuple[bool, str]:
    """Gate: is the challenger (anything with ``accuracy`` and ``latency_p50_ms``) better?

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


@dataclass(frozen=True)
class _Version:
    version: int
    accuracy: float
    latency_p50_ms: float
    size_bytes: float


def _evidence(mv) -> _Version | None:
    try:
        return _Version(
            int(mv.version),
            float(mv.tags[ACC_TAG]),
            float(mv.tags[LAT_TAG]),
            float(mv.tags.get(SIZE_TAG, "nan")),
        )
    except (KeyError, ValueError):
        return None


def _eligible(c, name: str) -> list[_Version]:
    """Versions with evidence that were not rolled back, in version order."""
    out = []
    for mv in c.search_model_versions(f"name='{name}'"):
        if mv.tags.get(ROLLED_BACK_TAG) == "true":
            continue
        ev = _evidence(mv)
        if ev is not None:
            out.append(ev)
    return sorted(out, key=lambda v: v.version)


def _fold(versions: list[_Version], acc_tol: float, lat_tol: float) -> _Version | None:
    """The champion: the gate applied in version order."""
    champ = None
    for v in versions:
        if champ is None or beats(v, asdict(champ), acc_tol, lat_tol)[0]:
            champ = v
    return champ


def _alias_version(c, name: str, alias: str) -> int | None:
    try:
        return int(c.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the alias is unset
        return None


def settle_champion(uri: str, name: str, alias: str, acc_tol: float, lat_tol: float) -> int | None:
    """Point ``alias`` at the champion the registry's versions determine; return its version.

    Safe to run concurrently (see the module docstring); deletes the alias when no version is
    eligible.
    """
    c = client(uri)
    last_error: MlflowException | None = None
    for _ in range(SETTLE_ROUNDS):
        versions = _eligible(c, name)
        champ = _fold(versions, acc_tol, lat_tol)
        want = champ.version if champ else None
        if _alias_version(c, name, alias) != want:
            try:
                if want is None:
                    c.delete_registered_model_alias(name, alias)
                else:
                    c.set_registered_model_alias(name, alias, str(want))
            except MlflowException as err:
                last_error = err
                # MLflow's alias write is read-then-insert: two promoters writing the alias at
                # the same moment can make one fail (UNIQUE constraint on the alias row, or the
                # alias already deleted). The other write stands; back off briefly and re-read.
                time.sleep(random.uniform(0.05, 0.3))
                continue
        if _eligible(c, name) == versions and _alias_version(c, name, alias) == want:
            return want
    why = f" (last alias write failed: {str(last_error).splitlines()[0]})" if last_error else ""
    raise TrackingError(f"{name}: alias {alias} did not settle after {SETTLE_ROUNDS} rounds{why}")


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
    source points there. The challenger is judged against the champion of the versions registered
    before it; the alias ends on the champion of all versions (see :func:`settle_champion`).
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
        "nasforge.accuracy_tolerance": repr(float(acc_tol)),
        "nasforge.latency_tolerance": repr(float(lat_tol)),
        **challenger.tags,
    }
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    mine = int(mv.version)
    earlier = _fold([v for v in _eligible(c, model_name) if v.version < mine], acc_tol, lat_tol)
    incumbent = (
        None
        if earlier is None
        else {"accuracy": earlier.accuracy, "latency_p50_ms": earlier.latency_p50_ms,
              "size_bytes": earlier.size_bytes}
    )  # fmt: skip
    if earlier is None:
        won, reason = True, "no champion yet"
    else:
        won, reason = beats(challenger, incumbent, acc_tol, lat_tol)
    champion = settle_champion(uri, model_name, alias, acc_tol, lat_tol)
    promoted = champion == mine
    if won and not promoted:
        reason += f"; but v{champion}, registered at the same time, beats it"
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
        incumbent_version=None if earlier is None else str(earlier.version),
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


def rollback(uri: str, model_name: str, target: str, acc_tol: float, lat_tol: float) -> Decision:
    """Withdraw the champion of ``target``: mark it rolled back and restore the previous one.

    The withdrawn version keeps its files and tags (``nasforge.rolled_back``), and never becomes
    champion again, so a later promotion cannot bring it back by accident.

    Raises:
        TrackingError: The target has no champion to roll back.
    """
    c = client(uri)
    alias = alias_for(target)
    current = _alias_version(c, model_name, alias)
    if current is None:
        raise TrackingError(f"{model_name}: no champion ({alias}) to roll back")
    c.set_model_version_tag(model_name, str(current), ROLLED_BACK_TAG, "true")
    c.set_model_version_tag(model_name, str(current), "nasforge.decision", "rolled-back")
    restored = settle_champion(uri, model_name, alias, acc_tol, lat_tol)
    reason = (
        f"rolled back v{current}; champion is now v{restored}"
        if restored is not None
        else f"rolled back v{current}; no earlier version is eligible, alias {alias} removed"
    )
    return Decision(
        target=target,
        model_name=model_name,
        alias=alias,
        version=None if restored is None else str(restored),
        promoted=restored is not None,
        reason=reason,
        incumbent_version=str(current),
    )
