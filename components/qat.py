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
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "qat",
        params_from_json(params_json),
        Path(quantized.path),
        parent_run_id=parent_run_id,
        dataset=Path(dataset.path),
        model=Path(model.path),
    )
