"""KFP component of the prepare-data stage (thin: the logic is in ``nasforge.stages.prepare_data``)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def prepare_data(params_json: str, parent_run_id: str, dataset: Output[Artifact]):
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "prepare-data",
        params_from_json(params_json),
        Path(dataset.path),
        parent_run_id=parent_run_id,
    )
