"""KFP component that opens the pipeline's parent MLflow run (every stage nests under it)."""

from typing import NamedTuple

from kfp import dsl

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def start_run(params_json: str, run_name: str) -> NamedTuple("Outputs", [("run_id", str)]):  # noqa: F821
    # A named output: kfp.local resolves channels by output name, and an unnamed "Output" here
    # collided with search's "Output" (the candidate list) inside the ParallelFor: the run id
    # became the loop item. kfp.local loops only over outputs named "Output", so search keeps it.
    from collections import namedtuple

    from nasforge.config import params_from_json
    from nasforge.tracking.mlflow_runs import open_parent_run

    params = params_from_json(params_json)
    run_id = open_parent_run(
        params.tracking.uri, params.tracking.experiment, run_name, params.model_dump(mode="json")
    )
    print(f"==> MLflow parent run {run_id}", flush=True)
    return namedtuple("Outputs", ["run_id"])(run_id)
