"""The nasforge DAG.

prepare-data -> search -> ParallelFor(candidate)[train -> prune -> qat -> export ->
ParallelFor(CPU target)[benchmark] (+ ParallelFor(GPU target)[benchmark on a GPU node]) -> collect]
-> Collected -> promote -> report. The parent MLflow run id is a pipeline parameter; every stage
task nests its own run under it.

The DAG is built for a list of targets (:func:`build_pipeline`): CPU and GPU targets get separate
inner loops because a task's image, GPU request, node selector and toleration are fixed when the
pipeline is compiled, and a loop exists only for a class of targets that is present — an empty
``ParallelFor`` feeding ``Collected`` fails in kfp.local and ``dsl.If``/``OneOf`` cannot be
collected, so the structure, not a runtime branch, separates them.

``collect`` gathers each candidate's inner loop(s): ``Collected`` of a nested ``ParallelFor``
reaches its consumer as a list of lists, which kfp.local cannot pass on (and a ``Collected``
consumed inside another loop does not compile).
"""

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact

from nasforge.components.benchmark import benchmark
from nasforge.components.collect import collect, collect_cpu_gpu
from nasforge.components.export import export
from nasforge.components.prepare_data import prepare_data
from nasforge.components.promote import promote
from nasforge.components.prune import prune
from nasforge.components.qat import qat
from nasforge.components.report import report
from nasforge.components.search import search
from nasforge.components.train import train
from nasforge.errors import ConfigError
from nasforge.pipelines.cluster import configure as configure_task

PIPELINE_NAME = "nasforge"
DESCRIPTION = "Hardware-aware NAS, compression and promotion per target"
#: Targets the committed, cluster-ready pipeline is compiled for (``make compile``).
CLUSTER_TARGETS = ("onnxruntime-cpu", "openvino-cpu", "tensorrt-gpu")


def split_targets(targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split target names into (CPU-node targets, GPU-node targets).

    Raises:
        TargetError: A name is not a known target.
        ConfigError: The list is empty.
    """
    from nasforge.hardware.targets import get_target

    if not targets:
        raise ConfigError("targets: at least one target is needed")
    cpu, gpu = [], []
    for name in targets:
        (gpu if get_target(name).needs_gpu else cpu).append(name)
    return cpu, gpu


def _dag(params_json, parent, cpu_targets, gpu_targets, retry=True):
    """Add every task; ``cpu_targets``/``gpu_targets`` are loop channels or None (no such loop)."""
    configure = partial(configure_task, retry=retry)
    data = configure(prepare_data(params_json=params_json, parent_run_id=parent), "prepare-data")
    found = configure(
        search(params_json=params_json, parent_run_id=parent, dataset=data.outputs["dataset"]),
        "search",
    )
    with dsl.ParallelFor(found.outputs["Output"], name="candidates") as candidate:
        trained = train(
            params_json=params_json,
            parent_run_id=parent,
            candidate=candidate,
            dataset=data.outputs["dataset"],
            search=found.outputs["search"],
        )
        configure(trained, "train")
        pruned = prune(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=trained.outputs["model"],
        )
        configure(pruned, "prune")
        quantized = qat(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=pruned.outputs["pruned"],
        )
        configure(quantized, "qat")
        exported = export(
            params_json=params_json,
            parent_run_id=parent,
            dataset=data.outputs["dataset"],
            model=pruned.outputs["pruned"],
            quantized=quantized.outputs["quantized"],
        )
        configure(exported, "export")
        measured = {}
        for kind, items in (("cpu", cpu_targets), ("gpu", gpu_targets)):
            if items is None:
                continue
            name = "targets" if kind == "cpu" else "gpu-targets"
            with dsl.ParallelFor(items, name=name) as target:
                task = benchmark(
                    params_json=params_json,
                    parent_run_id=parent,
                    target=target,
                    dataset=data.outputs["dataset"],
                    exported=exported.outputs["exported"],
                )
                configure(task, "benchmark", gpu=kind == "gpu")
            measured[kind] = dsl.Collected(task.outputs["result"])
        if len(measured) == 2:
            gathered = collect_cpu_gpu(results=measured["cpu"], gpu_results=measured["gpu"])
        else:
            gathered = collect(results=next(iter(measured.values())))
        configure(gathered, "collect")
    promoted = promote(
        params_json=params_json,
        parent_run_id=parent,
        benchmarks=dsl.Collected(gathered.outputs["collected"]),
    ).set_caching_options(False)
    configure(promoted, "promote")
    reported = report(
        params_json=params_json,
        parent_run_id=parent,
        search=found.outputs["search"],
        promotion=promoted.outputs["promotion"],
        benchmarks=dsl.Collected(gathered.outputs["collected"]),
    ).set_caching_options(False)
    configure(reported, "report")
    return reported.outputs["report"]


def build_pipeline(targets: Sequence[str], *, retry: bool = True):
    """The pipeline for these targets (their list is the default of its target parameters).

    ``retry=False`` builds it without task retries, for ``nasforge run``: on one machine a failed
    task failed on bad input or a bug, and running it again only delays the error (a killed
    run is continued by running it again instead).

    Pipeline parameters: ``params_json`` (``params.yaml`` as JSON), ``targets`` (CPU-node targets,
    if any), ``gpu_targets`` (GPU-node targets, if any), ``run_name``, ``parent_run_id`` (the
    MLflow run every stage run nests under; empty: not nested).

    Raises:
        TargetError: An unknown target.
        ConfigError: No targets.
    """
    cpu, gpu = split_targets(targets)
    deco = dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    # KFP reads parameters from the signature, so each class mix gets its own signature.
    if cpu and gpu:

        def nasforge_pipeline(
            params_json: str = "{}",
            targets: list = cpu,
            gpu_targets: list = gpu,
            run_name: str = "nasforge",
            parent_run_id: str = "",
        ) -> Artifact:
            return _dag(params_json, parent_run_id, targets, gpu_targets, retry)

    elif cpu:

        def nasforge_pipeline(
            params_json: str = "{}",
            targets: list = cpu,
            run_name: str = "nasforge",
            parent_run_id: str = "",
        ) -> Artifact:
            return _dag(params_json, parent_run_id, targets, None, retry)

    else:

        def nasforge_pipeline(
            params_json: str = "{}",
            gpu_targets: list = gpu,
            run_name: str = "nasforge",
            parent_run_id: str = "",
        ) -> Artifact:
            return _dag(params_json, parent_run_id, None, gpu_targets, retry)

    return deco(nasforge_pipeline)


def pipeline_arguments(targets: Sequence[str]) -> dict[str, list[str]]:
    """The target parameters of :func:`build_pipeline` for these targets."""
    cpu, gpu = split_targets(targets)
    args: dict[str, list[str]] = {}
    if cpu:
        args["targets"] = cpu
    if gpu:
        args["gpu_targets"] = gpu
    return args


def compile_pipeline(path: str | Path, targets: Sequence[str] = CLUSTER_TARGETS) -> Path:
    """Compile the pipeline for ``targets`` to KFP IR YAML at ``path``."""
    path = Path(path)
    pipeline = build_pipeline(targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return path


def check_package_targets(package: str | Path, targets: Sequence[str]) -> None:
    """Check that a compiled pipeline has a benchmark loop for each class of ``targets``.

    A package compiled for CPU targets only cannot benchmark ``tensorrt-gpu`` (no GPU loop, so no
    GPU node), and one compiled with a GPU loop must be given at least one GPU target.

    Raises:
        ConfigError: The package does not match the targets, or is not a nasforge pipeline.
    """
    import yaml

    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()))
        declared = set(spec["root"]["inputDefinitions"]["parameters"])
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError) as err:
        raise ConfigError(f"{package}: not a compiled nasforge pipeline ({err})") from None
    if "params_json" not in declared:
        raise ConfigError(f"{package}: not a compiled nasforge pipeline (no params_json parameter)")
    wanted = set(pipeline_arguments(targets))
    loops = declared & {"targets", "gpu_targets"}
    if wanted != loops:
        names = {"targets": "CPU", "gpu_targets": "GPU"}
        have = ", ".join(sorted(names[n] for n in loops)) or "no"
        need = ", ".join(sorted(names[n] for n in wanted))
        raise ConfigError(
            f"{package} benchmarks {have} targets but the params list {need} targets "
            f"({', '.join(targets)}); recompile: nasforge pipeline compile --params PARAMS"
        )
