"""KFP plumbing: gather one candidate's per-target benchmark folders into one artifact.

Not a stage (it has no logic of its own): KFP's ``Collected`` of a nested ``ParallelFor`` reaches
its consumer as a list of lists, which kfp.local cannot pass on, so each candidate first gathers
its inner loop(s) and promote/report collect the outer loop. ``collect_cpu_gpu`` is the same for a
candidate whose targets run in two loops (CPU nodes and GPU nodes).
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from nasforge.images import cpu_image


@dsl.component(base_image=cpu_image())
def collect(results: Input[list[Artifact]], collected: Output[Artifact]):
    import shutil
    from pathlib import Path

    out = Path(collected.path)
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(results):
        shutil.copytree(r.path, out / f"part-{i}")


@dsl.component(base_image=cpu_image())
def collect_cpu_gpu(
    results: Input[list[Artifact]],
    gpu_results: Input[list[Artifact]],
    collected: Output[Artifact],
):
    import shutil
    from pathlib import Path

    out = Path(collected.path)
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate([*results, *gpu_results]):
        shutil.copytree(r.path, out / f"part-{i}")
