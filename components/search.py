"""KFP component of the search stage (thin: the logic is in ``nasforge.stages.search``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def search(
    params_json: str, parent_run_id: str, dataset: Input[Artifact], search: Output[Artifact]
) -> list:
    from nasforge.stages.runner import run_task

    # The candidate indices drive the ParallelFor over the Pareto set.
    return run_task("search", params_json, parent_run_id, search, dataset=dataset)
