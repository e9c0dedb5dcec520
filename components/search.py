"""KFP component of the search stage (thin: the logic is in ``nasforge.stages.search``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def search(
    params_json: str, parent_run_id: str, dataset: Input[Artifact], search: Output[Artifact]
) -> list:
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    result = execute(
        "search",
        params_from_json(params_json),
        Path(search.path),
        parent_run_id=parent_run_id,
        dataset=Path(dataset.path),
    )
    # The candidate indices drive the ParallelFor over the Pareto set.
    return list(range(int(result.metrics["candidates"])))
