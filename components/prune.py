"""KFP component of the prune stage (thin: the logic is in ``nasforge.stages.prune``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def prune(
    params_json: str,
    parent_run_id: str,
    dataset: Input[Artifact],
    model: Input[Artifact],
    pruned: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task("prune", params_json, parent_run_id, pruned, dataset=dataset, model=model)
