"""KFP component of the export stage (thin: the logic is in ``nasforge.stages.export``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def export(
    params_json: str,
    parent_run_id: str,
    dataset: Input[Artifact],
    model: Input[Artifact],
    quantized: Input[Artifact],
    exported: Output[Artifact],
):
    from nasforge.stages.runner import run_task

    run_task(
        "export",
        params_json,
        parent_run_id,
        exported,
        dataset=dataset,
        model=model,
        quantized=quantized,
    )
