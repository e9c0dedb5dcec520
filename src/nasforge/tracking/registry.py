"""Model registry: register a target's best model and move ``champion-<target>`` only if it wins.

A registered version is an MLflow model (ONNX flavour, signature, input example; the OpenVINO IR
alongside; see :mod:`nasforge.tracking.mlflow_model`) whose tags carry the evidence of its
promotion decision. When a target has a champion, promotion downloads the champion from the
registry and times it and the challenger side by side in this process on the target's runtime
(:mod:`nasforge.tracking.side_by_side`), with confidence intervals on the latency ratio; the rules
are in :mod:`nasforge.tracking.gate`. Targets that cannot run models here (a GPU target on a CPU
node, a ``table:`` target), or a champion that cannot be timed, fall back to the recorded
benchmark latencies, and the decision says so. A challenger whose files are byte-identical to a
registered version (SHA-256 of the files, tag ``nasforge.content_sha256``) is not registered
again.

Concurrent promotions. MLflow has no compare-and-set for aliases, so two promoters that each read
the champion, win against it and write the alias could leave the *worse* of the two as champion.
Instead, the champion is a function of the registry's content: the gate applied in version order
(v1 is champion, each later version replaces the champion if it beats it), skipping versions
without evidence and versions rolled back. A version records which version it was timed against
(``nasforge.compared_with``) and the verdict (``nasforge.verdict``); that verdict is used when the
version it was compared with is the champion at that point of the fold, and otherwise (a version
registered while another promoter's version became champion, or after a rollback) the
recorded-latency rule of :func:`nasforge.tracking.gate.beats` decides, with the tolerances
recorded on the version. Every promoter registers its version with all of its evidence at once,
then settles the alias on that function and re-reads until the alias and the set of versions it
was computed from are both unchanged (a write that loses a race with another promoter's write is
retried), so whichever promoter writes last writes the answer all of them agree on: one
consistent champion, whatever the interleaving. Rolling back marks the champion
``nasforge.rolled_back`` and settles again, which restores the previous champion.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from nasforge.errors import ModelFileError, TargetError, TrackingError
from nasforge.tracking import gate
from nasforge.tracking.gate import ACC_EPS, GateSettings, beats
from nasforge.tracking.mlflow_runs import client

ACC_TAG = "nasforge.test_accuracy"
LAT_TAG = "nasforge.latency_p50_ms"
SIZE_TAG = "nasforge.size_bytes"
ROLLED_BACK_TAG = "nasforge.rolled_back"
SHA_TAG = "nasforge.content_sha256"
COMPARED_TAG = "nasforge.compared_with"
VERDICT_TAG = "nasforge.verdict"
EVIDENCE_TAG = "nasforge.evidence"
ACC_TOL_TAG = "nasforge.accuracy_tolerance"
LAT_TOL_TAG = "nasforge.latency_tolerance"
FLOOR_TAG = "nasforge.latency_floor_ms"
#: Settling re-reads the registry until nothing changed between two reads; each round is a few
#: requests, and only promoters registering at the same moment make it take more than one.
SETTLE_ROUNDS = 20
SIDE_BY_SIDE, RECORDED, FIRST, IDENTICAL = "side-by-side", "recorded", "first", "identical"
CI_METHOD = f"percentile bootstrap ({gate.BOOTSTRAP_RESAMPLES} resamples) of the median over rounds"

__all__ = [
    "ACC_EPS",
    "Challenger",
    "Decision",
    "GateSettings",
    "alias_for",
    "beats",
    "model_name_for",
    "register_and_promote",
    "rollback",
    "settle_champion",
]


def model_name_for(prefix: str, target: str) -> str:
    """The registered model of a target (one per target, so each has its own versions)."""
    return f"{prefix}-{target}".replace(":", "-")


def alias_for(target: str) -> str:
    """The champion alias of a target (registry aliases allow letters, digits, '-' and '_')."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in target)
    return f"champion-{safe}"


@dataclass
class Challenger:
    """The model proposed for a target and its measured evidence.

    Attributes:
        target: Target name.
        files: The benchmark's model folder (``<candidate>/model/<precision>/``): the ONNX graph
            and, for OpenVINO, the IR the target runs.
        accuracy: Test accuracy of the exported model.
        latency_p50_ms: The benchmark's p50 at batch 1 (the recorded latency).
        size_bytes: Bytes of the files the target runs.
        precision: ``fp32`` or ``int8``.
        candidate: Candidate name.
        arch_str: Architecture.
        tags: Extra version tags (e.g. the DVC hash).
    """

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
    """What promotion did for one target, and why.

    ``version`` is the registered version, or for an identical artifact the version it is
    identical to (``registered`` False, ``identical_to`` set). ``evidence`` holds both timings
    with their intervals, accuracies, content hashes, rounds, runtime and machine.
    """

    target: str
    model_name: str
    alias: str
    version: str | None
    promoted: bool
    reason: str
    incumbent_version: str | None = None
    incumbent: dict[str, float] | None = None
    challenger: dict[str, Any] | None = None
    registered: bool = False
    identical_to: str | None = None
    evidence: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class _Version:
    version: int
    accuracy: float
    latency_p50_ms: float
    size_bytes: float
    compared_with: int | None = None
    verdict: str | None = None
    acc_tol: float | None = None
    lat_tol: float | None = None
    floor_ms: float | None = None


def _float_tag(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _evidence(mv) -> _Version | None:
    tags = mv.tags
    try:
        acc, lat = float(tags[ACC_TAG]), float(tags[LAT_TAG])
    except (KeyError, ValueError):
        return None
    compared = tags.get(COMPARED_TAG, "")
    return _Version(
        int(mv.version),
        acc,
        lat,
        float(tags.get(SIZE_TAG, "nan")),
        int(compared) if compared.isdigit() else None,
        tags.get(VERDICT_TAG),
        _float_tag(tags, ACC_TOL_TAG),
        _float_tag(tags, LAT_TOL_TAG),
        _float_tag(tags, FLOOR_TAG),
    )


def _versions(c, name: str) -> list:
    return list(c.search_model_versions(f"name='{name}'"))


def _eligible_of(mvs: list) -> list[_Version]:
    """Versions with evidence that were not rolled back, in version order."""
    out = []
    for mv in mvs:
        if mv.tags.get(ROLLED_BACK_TAG) == "true":
            continue
        ev = _evidence(mv)
        if ev is not None:
            out.append(ev)
    return sorted(out, key=lambda v: v.version)


def _eligible(c, name: str) -> list[_Version]:
    return _eligible_of(_versions(c, name))


def _wins(v: _Version, champ: _Version, acc_tol: float, lat_tol: float, floor_ms: float) -> bool:
    """Does ``v`` replace ``champ`` in the fold? Its own verdict if it was judged against
    ``champ``, else the recorded-latency rule with the tolerances recorded on ``v``."""
    if v.compared_with == champ.version and v.verdict in ("wins", "loses"):
        return v.verdict == "wins"
    return beats(
        v,
        {"accuracy": champ.accuracy, "latency_p50_ms": champ.latency_p50_ms},
        acc_tol if v.acc_tol is None else v.acc_tol,
        lat_tol if v.lat_tol is None else v.lat_tol,
        floor_ms if v.floor_ms is None else v.floor_ms,
    )[0]


def _fold(
    versions: list[_Version], acc_tol: float, lat_tol: float, floor_ms: float = 0.0
) -> _Version | None:
    """The champion: the gate applied in version order."""
    champ = None
    for v in versions:
        if champ is None or _wins(v, champ, acc_tol, lat_tol, floor_ms):
            champ = v
    return champ


def _alias_version(c, name: str, alias: str) -> int | None:
    try:
        return int(c.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the alias is unset
        return None


def settle_champion(
    uri: str, name: str, alias: str, acc_tol: float, lat_tol: float, floor_ms: float = 0.0
) -> int | None:
    """Point ``alias`` at the champion the registry's versions determine; return its version.

    Safe to run concurrently (see the module docstring); deletes the alias when no version is
    eligible. The tolerances apply to versions that do not record their own.
    """
    c = client(uri)
    last_error: MlflowException | None = None
    for _ in range(SETTLE_ROUNDS):
        versions = _eligible(c, name)
        champ = _fold(versions, acc_tol, lat_tol, floor_ms)
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


# ------------------------------------------------------------------------------------ evidence


def _interval(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def evidence_text(ev: dict[str, Any]) -> str:
    """One line of the latency evidence, e.g. for the reason and the report."""
    ch, inc = ev.get("challenger", {}), ev.get("champion", {})
    acc = f"accuracy {ch.get('accuracy', float('nan')):.4f} vs {inc.get('accuracy', float('nan')):.4f}"
    floor = ev.get("latency_floor_ms", 0.0)
    if ev.get("method") == SIDE_BY_SIDE:
        how = (
            f"timed side by side ({ev['rounds']} interleaved rounds x {ev['repeats']} runs, "
            f"{ev['runtime']}, {ev['confidence']:.0%} CI)"
        )
    else:
        how = f"recorded benchmark latencies ({ev.get('not_timed_because', 'not re-timed')})"
    lat = (
        f"{ch.get('latency_ms', float('nan')):.3f} ms {_interval(ch.get('latency_ci_ms'))} vs "
        f"champion {inc.get('latency_ms', float('nan')):.3f} ms {_interval(inc.get('latency_ci_ms'))}"
    )
    ratio = f"ratio {ev['ratio']:.3f} {_interval(ev.get('ratio_ci'))}".rstrip()
    diff = f"difference {ev['difference_ms']:+.3f} ms"
    if ev["latency_verdict"] == gate.TIE:
        diff += f" (below the {floor} ms floor: a tie)"
    return f"{how}: {lat}, {ratio}, {diff}; {acc}"


def _side(v: Any, sha: str | None, cmp: dict[str, Any], key: str, version: int | None) -> dict:
    out: dict[str, Any] = {
        "accuracy": float(v.accuracy),
        "recorded_latency_p50_ms": float(v.latency_p50_ms),
        "sha256": sha,
        "latency_ms": cmp.get(f"{key}_ms"),
        "latency_ci_ms": cmp.get(f"{key}_ci_ms"),
    }
    if version is not None:
        out["version"] = str(version)
    return out


def _compare(
    uri: str,
    model_name: str,
    champ: _Version,
    champ_sha: str | None,
    challenger: Challenger,
    runtime_file: Path,
    sha: str,
    settings: GateSettings,
) -> dict[str, Any]:
    """Evidence of challenger vs champion: timed side by side here when the target can run models
    and the champion downloads and loads, else the recorded latencies (labelled why)."""
    from nasforge.hardware.targets import get_target
    from nasforge.tracking.mlflow_model import download_version, runtime_file_in
    from nasforge.tracking.side_by_side import (
        CHALLENGER,
        CHAMPION,
        machine,
        time_side_by_side,
        timing_problem,
    )

    target = challenger.target
    problem = timing_problem(target)
    timing: dict[str, Any] | None = None
    if problem is None:
        runtime = get_target(target).runtime
        try:
            with tempfile.TemporaryDirectory(prefix="nasforge-champion-") as tmp:
                local = download_version(uri, model_name, str(champ.version), Path(tmp))
                champ_file = runtime_file_in(local, runtime)
                if champ_file is None:
                    raise ModelFileError(f"it has no {runtime} model file")
                timing = time_side_by_side(champ_file, runtime_file, target, settings)
        except (TrackingError, ModelFileError, TargetError) as err:
            problem = f"champion v{champ.version} could not be timed here: {err}"
    ev: dict[str, Any] = {
        "target": target,
        "accuracy_tolerance": settings.accuracy_tolerance,
        "latency_tolerance": settings.latency_tolerance,
        "latency_floor_ms": settings.latency_floor_ms,
        "batch_size": 1,
    }
    if timing is not None:
        cmp = gate.compare_rounds(timing[CHAMPION], timing[CHALLENGER], settings)
        ev |= {
            "method": SIDE_BY_SIDE,
            "rounds": settings.rounds,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "confidence": settings.confidence,
            "ci_method": CI_METHOD,
            "runtime": timing["runtime"],
            "machine": timing["machine"],
            "input_shapes": timing["input_shapes"],
            "executed_precision": timing["executed_precision"],
            "round_ms": {k: [round(v, 5) for v in timing[k]] for k in (CHAMPION, CHALLENGER)},
        }
    else:
        cmp = gate.compare_recorded(
            champ.latency_p50_ms,
            challenger.latency_p50_ms,
            settings.latency_tolerance,
            settings.latency_floor_ms,
        )
        ev |= {"method": RECORDED, "not_timed_because": problem}
        try:
            ev["machine"] = machine(target, settings.threads)
        except Exception:  # noqa: BLE001 - a table target has no runtime to describe
            ev["machine"] = None
    ev |= {k: cmp[k] for k in ("ratio", "difference_ms", "latency_verdict")}
    for k in ("ratio_ci", "difference_ci_ms"):
        if k in cmp:
            ev[k] = cmp[k]
    ev["champion"] = _side(champ, champ_sha, cmp, "champion", champ.version)
    ev["challenger"] = _side(challenger, sha, cmp, "challenger", None)
    return ev


def _version_tags(
    challenger: Challenger,
    settings: GateSettings,
    sha: str,
    compared_with: int | None,
    won: bool,
    ev: dict[str, Any],
) -> dict[str, str]:
    tags = {
        ACC_TAG: repr(float(challenger.accuracy)),
        LAT_TAG: repr(float(challenger.latency_p50_ms)),
        SIZE_TAG: str(challenger.size_bytes),
        SHA_TAG: sha,
        COMPARED_TAG: "" if compared_with is None else str(compared_with),
        VERDICT_TAG: "wins" if won else "loses",
        EVIDENCE_TAG: json.dumps(ev, separators=(",", ":"), default=str),
        "nasforge.gate.method": ev["method"],
        "nasforge.target": challenger.target,
        "nasforge.precision": challenger.precision,
        "nasforge.candidate": challenger.candidate,
        "nasforge.arch_str": challenger.arch_str,
        ACC_TOL_TAG: repr(float(settings.accuracy_tolerance)),
        LAT_TOL_TAG: repr(float(settings.latency_tolerance)),
        FLOOR_TAG: repr(float(settings.latency_floor_ms)),
        **challenger.tags,
    }
    if ev["method"] in (SIDE_BY_SIDE, RECORDED):
        ch, inc = ev["challenger"], ev["champion"]
        tags |= {
            "nasforge.gate.latency_verdict": ev["latency_verdict"],
            "nasforge.gate.latency_ratio": f"{ev['ratio']:.4f}",
            "nasforge.gate.challenger_latency_ms": f"{ch['latency_ms']:.4f}",
            "nasforge.gate.champion_latency_ms": f"{inc['latency_ms']:.4f}",
            "nasforge.gate.champion_accuracy": repr(float(inc["accuracy"])),
        }
        if "ratio_ci" in ev:
            tags["nasforge.gate.latency_ratio_ci"] = _interval(ev["ratio_ci"])
            tags["nasforge.gate.challenger_latency_ci_ms"] = _interval(ch["latency_ci_ms"])
            tags["nasforge.gate.champion_latency_ci_ms"] = _interval(inc["latency_ci_ms"])
            tags["nasforge.gate.rounds"] = str(ev["rounds"])
            tags["nasforge.gate.runtime"] = ev["runtime"]
        if ev.get("machine"):
            tags["nasforge.gate.machine"] = (
                f"{ev['machine'].get('cpu_model')} ({ev['machine'].get('threads')} threads, "
                f"{ev['machine'].get('host')})"
            )
    return tags


def _identical(mvs: list, sha: str, champ: _Version | None) -> tuple[str, str] | None:
    """``(version, reason)`` when a registered version has exactly these files."""
    same = sorted((int(mv.version), mv) for mv in mvs if mv.tags.get(SHA_TAG) == sha)
    if not same:
        return None
    champ_v = champ.version if champ else None
    version, mv = next(((v, m) for v, m in same if v == champ_v), same[-1])
    short = sha[:12]
    if version == champ_v:
        why = f"identical to champion v{version} (sha256 {short}…); not registered again"
    elif mv.tags.get(ROLLED_BACK_TAG) == "true":
        why = f"identical to v{version}, which was rolled back (sha256 {short}…); not registered"
    else:
        why = (
            f"identical to v{version}, registered earlier and not champion (sha256 {short}…); "
            "not registered again"
        )
    return str(version), why


def _summary(v: _Version | None) -> dict[str, float] | None:
    if v is None:
        return None
    return {"accuracy": v.accuracy, "latency_p50_ms": v.latency_p50_ms, "size_bytes": v.size_bytes}


def _ensure_registered_model(c, name: str, target: str) -> None:
    try:
        c.create_registered_model(name, description=f"nasforge models for {target}")
    except MlflowException:  # already exists (or created by a concurrent promoter)
        pass


def register_and_promote(
    uri: str,
    run_id: str,
    model_name: str,
    challenger: Challenger,
    acc_tol: float,
    lat_tol: float,
    settings: GateSettings | None = None,
) -> Decision:
    """Register ``challenger`` as a new version of ``model_name``; move the alias if it wins.

    The challenger is compared with the current champion (timed side by side where the target
    can run models here, else on recorded latencies), logged as an MLflow ONNX model of run
    ``run_id`` and registered with its evidence; the alias ends on the champion of all versions
    (see :func:`settle_champion`). Files identical to a registered version are not registered
    again (the decision names that version).

    Args:
        uri: Tracking (and registry) URI.
        run_id: The promote stage's run; the MLflow model is one of its outputs.
        model_name: Registered model, ``<prefix>-<target>``.
        challenger: The model proposed.
        acc_tol: Accuracy a faster challenger may lose.
        lat_tol: Relative latency change that counts as faster or slower.
        settings: The rest of the gate (floor, rounds, ...); tolerances from the two arguments.

    Raises:
        ModelFileError: The challenger's folder has no ONNX graph or a file that cannot load.
        TrackingError: The tracking store cannot be used.
    """
    from nasforge.hardware.targets import get_target
    from nasforge.runtimes.registry import BASE_RUNTIME
    from nasforge.tracking.mlflow_model import content_sha256, log_onnx_model, model_files_for

    settings = dataclasses.replace(
        settings or GateSettings(), accuracy_tolerance=acc_tol, latency_tolerance=lat_tol
    )
    floor = settings.latency_floor_ms
    c = client(uri)
    alias = alias_for(challenger.target)
    t = get_target(challenger.target)
    files = model_files_for(challenger.files, t.runtime if t.kind == "runtime" else BASE_RUNTIME)
    sha = content_sha256(challenger.files)
    _ensure_registered_model(c, model_name, challenger.target)
    mvs = _versions(c, model_name)
    champ = _fold(_eligible_of(mvs), acc_tol, lat_tol, floor)
    summary = {
        "accuracy": challenger.accuracy,
        "latency_p50_ms": challenger.latency_p50_ms,
        "size_bytes": challenger.size_bytes,
        "precision": challenger.precision,
        "candidate": challenger.candidate,
        "arch_str": challenger.arch_str,
        "sha256": sha,
    }
    same = _identical(mvs, sha, champ)
    if same is not None:
        return Decision(
            target=challenger.target,
            model_name=model_name,
            alias=alias,
            version=same[0],
            promoted=False,
            reason=same[1],
            incumbent_version=None if champ is None else str(champ.version),
            incumbent=_summary(champ),
            challenger=summary,
            identical_to=same[0],
            evidence={"method": IDENTICAL, "sha256": sha, "version": same[0]},
        )
    if champ is None:
        ev: dict[str, Any] = {
            "method": FIRST,
            "target": challenger.target,
            "challenger": _side(challenger, sha, {}, "challenger", None),
        }
        won, reason = True, "no champion yet"
    else:
        champ_mv = next(mv for mv in mvs if int(mv.version) == champ.version)
        ev = _compare(
            uri, model_name, champ, champ_mv.tags.get(SHA_TAG), challenger, files.runtime_file,
            sha, settings,
        )  # fmt: skip
        won, why = gate.judge(challenger.accuracy, champ.accuracy, ev["latency_verdict"], acc_tol)
        head = f"beats champion v{champ.version}" if won else f"kept champion v{champ.version}"
        reason = f"{head}: {why}; {evidence_text(ev)}"
    ev["verdict"] = "wins" if won else "loses"
    model_uri, model_id = log_onnx_model(
        uri,
        run_id,
        f"{alias.removeprefix('champion-')}-{challenger.candidate}-{challenger.precision}",
        files,
        t.device,
        settings.threads,
        {"target": challenger.target, "precision": challenger.precision,
         "candidate": challenger.candidate, "arch_str": challenger.arch_str,
         "content_sha256": sha, "runtime_file": files.runtime_file.name},
    )  # fmt: skip
    tags = _version_tags(
        challenger, settings, sha, None if champ is None else champ.version, won, ev
    )
    try:
        mv = c.create_model_version(
            model_name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id
        )
    except MlflowException as err:
        raise TrackingError(f"cannot register {model_name}: {str(err).splitlines()[0]}") from err
    mine = int(mv.version)
    earlier = _fold(
        [v for v in _eligible(c, model_name) if v.version < mine], acc_tol, lat_tol, floor
    )
    champion = settle_champion(uri, model_name, alias, acc_tol, lat_tol, floor)
    promoted = champion == mine
    if earlier is not None and champ is not None and earlier.version != champ.version:
        reason += f"; meanwhile v{earlier.version} was registered and became champion"
    if won and not promoted:
        reason += f"; but v{champion}, registered at the same time, is champion"
    elif promoted and not won:
        # Only a concurrent registration or rollback changes what this version is judged against.
        against = f"v{earlier.version}" if earlier else "no earlier version (all rolled back)"
        reason += f"; champion nonetheless: judged against {against} in the registry's order"
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
        incumbent=_summary(earlier),
        challenger=summary,
        registered=True,
        evidence=ev,
    )


def rollback(
    uri: str, model_name: str, target: str, acc_tol: float, lat_tol: float, floor_ms: float = 0.0
) -> Decision:
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
    restored = settle_champion(uri, model_name, alias, acc_tol, lat_tol, floor_ms)
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
