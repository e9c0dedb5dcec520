"""KFP component of the report stage (thin: the logic is in ``nasforge.stages.report``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def report(
    params_json: str,
    parent_run_id: str,
    search: Input[Artifact],
    promotion: Input[Artifact],
    benchmarks: Input[list[Artifact]],
    report: Output[Artifact],
):
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute
    from nasforge.tracking.mlflow_runs import close_run

    params = params_from_json(params_json)
    execute(
        "report",
        params,
        Path(report.path),
        parent_run_id=parent_run_id,
        search=Path(search.path),
        promotion=Path(promotion.path),
        benchmarks=[Path(b.path) for b in benchmarks],
    )
    if parent_run_id:
        close_run(params.tracking.uri, parent_run_id)
