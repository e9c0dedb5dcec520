"""The nasforge DAG.

prepare-data -> search -> ParallelFor(candidate)[train -> prune -> qat -> export ->
ParallelFor(target)[benchmark] -> collect] -> Collected -> promote -> report. A first task opens the
parent MLflow run id is a pipeline parameter; every stage task nests its own run under it.

``collect`` gathers each candidate's inner loop: ``Collected`` of a nested ``ParallelFor`` reaches
its consumer as a list of lists, which kfp.local cannot pass on (and a ``Collected`` consumed
inside another loop does not compile).
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact

from nasforge.components.benchmark import benchmark
from nasforge.components.collect import collect
from nasforge.components.export import export
from nasforge.components.prepare_data import prepare_data
from nasforge.components.promote import promote
from nasforge.components.prune import prune
from nasforge.components.qat import qat
from nasforge.components.report import report
from nasforge.components.search import search
from nasforge.components.train import train

PIPELINE_NAME = "nasforge"


@dsl.pipeline(
    name=PIPELINE_NAME, description="Hardware-aware NAS, compression and promotion per target"
)
def nasforge_pipeline(
    params_json: str = "{}",
    targets: list = ["onnxruntime-cpu", "openvino-cpu"],  # noqa: B006 - KFP needs a literal default
    run_name: str = "nasforge",
    parent_run_id: str = "",
) -> Artifact:
    """The whole pipeline; ``params_json`` is ``params.yaml`` as JSON, ``targets`` its target list."""
    # The parent MLflow run is a pipeline parameter, opened by whoever launches the run: kfp.local
    # resolves a *task output* used inside a ParallelFor to the loop item, so a start-run task's id
    # would not reach the loop's tasks. Empty: stage runs are not nested.
    parent = parent_run_id
    data = prepare_data(params_json=params_json, parent_run_id=parent)
    found = search(params_json=params_json, parent_run_id=parent, dataset=data.outputs["dataset"])
    with dsl.ParallelFor(found.outputs["Output"], name="candidates") as candidate:
        trained = train(
            params_json=params_json,
            parent_run_id=parent,
            candidate=candidate,
            dataset=data.outputs["dataset"],
            search=found.outputs["search"],
        )
        pruned = prune(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=trained.outputs["model"],
        )
        quantized = qat(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=pruned.outputs["pruned"],
        )
        exported = export(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=pruned.outputs["pruned"],
            quantized=quantized.outputs["quantized"],
        )
        with dsl.ParallelFor(targets, name="targets") as target:
            measured = benchmark(
                params_json=params_json,
                parent_run_id=parent,
                target=target,
                dataset=data.outputs["dataset"],
                exported=exported.outputs["exported"],
            )
        gathered = collect(results=dsl.Collected(measured.outputs["result"]))
    promoted = promote(
        params_json=params_json,
        parent_run_id=parent,
        benchmarks=dsl.Collected(gathered.outputs["collected"]),
    ).set_caching_options(False)
    reported = report(
        params_json=params_json,
        parent_run_id=parent,
        search=found.outputs["search"],
        promotion=promoted.outputs["promotion"],
        benchmarks=dsl.Collected(gathered.outputs["collected"]),
    ).set_caching_options(False)
    return reported.outputs["report"]


def compile_pipeline(path: str | Path) -> Path:
    """Compile the pipeline to KFP IR YAML at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(nasforge_pipeline, str(path))
    return path
