"""KFP component of the promote stage (thin: the logic is in ``nasforge.stages.promote``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def promote(
    params_json: str,
    parent_run_id: str,
    benchmarks: Input[list[Artifact]],
    promotion: Output[Artifact],
):
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "promote",
        params_from_json(params_json),
        Path(promotion.path),
        parent_run_id=parent_run_id,
        benchmarks=[Path(b.path) for b in benchmarks],
    )
