"""Run the whole pipeline on this machine with ``kfp.local`` (no cluster).

Before any task starts, the configuration, the dataset path, the targets and the tracking store
are checked, so bad input fails in one line instead of half-way through the DAG. Relative paths of
the tracking store and the DVC remote are made absolute, because KFP tasks run as separate
processes. The report and summary are copied to ``runs/<run-id>/`` and ``runs/latest/``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from nasforge.config import Params, load_params
from nasforge.errors import DataError, NasforgeError


def _absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    return uri


def preflight(params: Params) -> Params:
    """Validate what a run needs and return params with absolute local paths.

    Raises:
        NasforgeError: The dataset, a target or the tracking store cannot be used.
    """
    from nasforge.hardware.targets import get_target
    from nasforge.tracking.mlflow_runs import check_reachable

    if params.data.source != "digits" and not Path(params.data.source).expanduser().exists():
        raise DataError(f"dataset not found: {params.data.source}")
    for name in params.targets:
        get_target(name).check_available()
    tracking = params.tracking.model_copy(
        update={
            "uri": _absolute_uri(params.tracking.uri),
            "dvc_remote": str(Path(params.tracking.dvc_remote).expanduser().absolute()),
        }
    )
    check_reachable(tracking.uri)
    data = params.data
    if data.source != "digits":
        data = data.model_copy(update={"source": str(Path(data.source).expanduser().absolute())})
    return params.model_copy(update={"tracking": tracking, "data": data})


def _publish(report_dir: Path, runs_dir: Path) -> tuple[Path, dict]:
    summary = json.loads((report_dir / "summary.json").read_text())
    dest = runs_dir / summary["run_id"]
    latest = runs_dir / "latest"
    for d in (dest, latest):
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(report_dir, d)
    return dest, summary


def run_local(params_path: str | Path, runs_dir: str | Path = "runs") -> dict:
    """Run the full DAG with ``kfp.local`` and publish its report.

    Returns:
        The run's summary.

    Raises:
        NasforgeError: Bad input, or a pipeline task failed.
    """
    import kfp.local

    params = preflight(load_params(params_path))
    runs_dir = Path(runs_dir).absolute()
    runs_dir.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(runs_dir / "kfp-local")
    )
    from nasforge.pipelines.nasforge_pipeline import build_pipeline, pipeline_arguments

    run_name = f"{params.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"==> nasforge run {run_name}: {len(params.targets)} target(s) {params.targets}, dataset {params.data.source}",
        flush=True,
    )
    t0 = time.perf_counter()
    from nasforge.tracking.mlflow_runs import close_run, open_parent_run

    tp = params.tracking
    parent = open_parent_run(tp.uri, tp.experiment, run_name, params.model_dump(mode="json"))
    print(f"==> MLflow parent run {parent}", flush=True)
    try:
        task = build_pipeline(params.targets)(
            params_json=params.to_json(),
            **pipeline_arguments(params.targets),
            run_name=run_name,
            parent_run_id=parent,
        )
    except RuntimeError as err:  # kfp.local reports a failed task this way; its log is above
        close_run(tp.uri, parent, "FAILED")
        raise NasforgeError(f"pipeline failed: {str(err).splitlines()[0]}") from None
    dest, summary = _publish(Path(task.output.path), runs_dir)
    print(f"==> pipeline finished in {time.perf_counter() - t0:.0f}s", flush=True)
    for target, s in summary["targets"].items():
        acc = f"{s['accuracy']:.4f}" if s.get("accuracy") is not None else "-"
        lat = f"{s['latency_p50_ms']:.3f} ms" if s.get("latency_p50_ms") is not None else "-"
        verdict = "promoted" if s["promoted"] else "not promoted"
        print(
            f"    {target}: {s.get('model_name')} v{s.get('version')} acc {acc} p50@1 {lat} -> {verdict} ({s['reason']})"
        )
    print(f"==> report:  {dest / 'report.html'}")
    print(f"==> summary: {dest / 'summary.json'} (also {runs_dir / 'latest' / 'summary.json'})")
    return summary
