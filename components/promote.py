"""KFP component of the promote stage (thin: the logic is in ``nasforge.stages.promote``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def promote(
    params_json: str,
    parent_run_id: str,
    benchmarks: Input[list[Artifact]],
    promotion: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task("promote", params_json, parent_run_id, promotion, benchmarks=benchmarks)
