"""KFP component of the prepare-data stage (thin: the logic is in ``nasforge.stages.prepare_data``)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def prepare_data(params_json: str, parent_run_id: str, dataset: Output[Artifact]):
    from nasforge.stages.runner import run_task

    run_task("prepare-data", params_json, parent_run_id, dataset)
