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
    from pathlib import Path

    from nasforge.config import params_from_json
    from nasforge.stages.runner import execute

    execute(
        "benchmark",
        params_from_json(params_json),
        Path(result.path),
        parent_run_id=parent_run_id,
        run_name=f"benchmark-{target}",
        dataset=Path(dataset.path),
        exported=[Path(exported.path)],
        target=target,
    )
