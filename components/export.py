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
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "export",
        params_from_json(params_json),
        Path(exported.path),
        parent_run_id=parent_run_id,
        dataset=Path(dataset.path),
        model=Path(model.path),
        quantized=Path(quantized.path),
    )
