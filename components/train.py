"""KFP component of the train stage (thin: the logic is in ``nasforge.stages.train``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def train(
    params_json: str,
    parent_run_id: str,
    candidate: int,
    dataset: Input[Artifact],
    search: Input[Artifact],
    model: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task(
        "train",
        params_json,
        parent_run_id,
        model,
        dataset=dataset,
        search=search,
        candidate=candidate,
    )
