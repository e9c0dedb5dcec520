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
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "train",
        params_from_json(params_json),
        Path(model.path),
        parent_run_id=parent_run_id,
        run_name=f"train-cand-{candidate}",
        dataset=Path(dataset.path),
        search=Path(search.path),
        candidate=candidate,
    )
