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
    from nasforge.stages.runner import run_task

    # The report ends the pipeline: the runner marks the parent MLflow run finished.
    run_task(
        "report",
        params_json,
        parent_run_id,
        report,
        search=search,
        promotion=promotion,
        benchmarks=benchmarks,
    )
