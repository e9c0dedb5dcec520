"""KFP component of the benchmark stage (thin: the logic is in ``nasforge.stages.benchmark``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def benchmark(
    params_json: str,
    parent_run_id: str,
    target: str,
    dataset: Input[Artifact],
    exported: Input[Artifact],
    result: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task(
        "benchmark",
        params_json,
        parent_run_id,
        result,
        dataset=dataset,
        exported=exported,
        target=target,
    )
