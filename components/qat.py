"""KFP component of the qat stage (thin: the logic is in ``nasforge.stages.qat``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def qat(
    params_json: str,
    parent_run_id: str,
    dataset: Input[Artifact],
    model: Input[Artifact],
    quantized: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task("qat", params_json, parent_run_id, quantized, dataset=dataset, model=model)
