"""What every pipeline task asks of a Kubernetes cluster (ignored by kfp.local).

One place for the settings an MLOps engineer tunes per cluster: retries with exponential backoff,
the shared data volume, the Secrets and ConfigMap the tasks read as environment variables, and
what puts GPU targets on GPU nodes. The names match the objects in ``manifests/`` (PVC
``nasforge-pipeline-data``, Secrets ``nasforge-mlflow`` and ``nasforge-object-store``, ConfigMap
``nasforge-config``). Each stage's CPU/memory requests and limits, and whether it may be
retried, are part of its declaration (:mod:`nasforge.stages.declarations`); only the plumbing
tasks' are here.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from nasforge.images import gpu_image
from nasforge.stages.declarations import DECLARATIONS, Resources

#: Where the pipeline-data PVC is mounted in every task (datasets, DVC remote/cache on a cluster).
DATA_PVC = "nasforge-pipeline-data"
DATA_MOUNT = "/data"
#: Secrets referenced by name (never inlined); optional so a cluster without authentication or
#: an object store still runs. Keys become environment variables of the same name.
MLFLOW_SECRET = "nasforge-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
OBJECT_STORE_SECRET = "nasforge-object-store"
OBJECT_STORE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
#: GPU nodes: the label the NVIDIA GPU operator / device plugin puts on them, and their taint.
GPU_NODE_SELECTOR = ("nvidia.com/gpu.present", "true")
GPU_RESOURCE = "nvidia.com/gpu"
#: Retries: transient failures (node pre-emption, image pull, a flaky object store) are retried
#: with exponential backoff 60 s, 120 s, ... capped at 10 min.
RETRIES = 2
BACKOFF = "60s"
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = "600s"


#: KFP plumbing tasks that are not stages (they move files; no data volume, no credentials).
PLUMBING_RESOURCES: dict[str, Resources] = {"collect": Resources("100m", "500m", "256Mi", "1Gi")}
#: Per task: each stage's declared resources, then the plumbing's.
STAGE_RESOURCES: dict[str, Resources] = {
    **{d.name: d.resources for d in DECLARATIONS},
    **PLUMBING_RESOURCES,
}
#: Stages that must not be retried blindly (declared ``retry=False``: a retried promote would
#: register the model again).
NO_RETRY = frozenset(d.name for d in DECLARATIONS if not d.retry)


def configure(
    task: dsl.PipelineTask, stage: str, *, gpu: bool = False, retry: bool = True
) -> dsl.PipelineTask:
    """Apply the cluster settings of ``stage`` to ``task``.

    Args:
        task: The pipeline task.
        stage: Key of :data:`STAGE_RESOURCES`.
        gpu: Run on a GPU node: GPU image, one ``nvidia.com/gpu``, node selector and toleration.
        retry: Retry a failed attempt with backoff (cluster: pre-emption, image pulls, a flaky
            object store); off for local runs, where a failure is bad input or a bug.

    Returns:
        The same task, for chaining.
    """
    res = STAGE_RESOURCES[stage]
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if retry and stage not in NO_RETRY:
        task.set_retry(
            num_retries=RETRIES,
            backoff_duration=BACKOFF,
            backoff_factor=BACKOFF_FACTOR,
            backoff_max_duration=BACKOFF_MAX,
        )
    if stage in PLUMBING_RESOURCES:  # plumbing only: no data, no credentials
        return task
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    kubernetes.use_secret_as_env(
        task, MLFLOW_SECRET, {k: k for k in MLFLOW_SECRET_KEYS}, optional=True
    )
    kubernetes.use_secret_as_env(
        task, OBJECT_STORE_SECRET, {k: k for k in OBJECT_STORE_SECRET_KEYS}, optional=True
    )
    if gpu:
        task.set_display_name(f"{stage}-gpu")
        task.set_container_image(gpu_image())
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        key, value = GPU_NODE_SELECTOR
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task
