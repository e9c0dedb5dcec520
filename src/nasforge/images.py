"""Names of the container images every KFP component runs in.

One setting names each image, so the image a component runs in, the image ``make images`` builds
and the image a cluster pulls are always the same: the environment variable ``NASFORGE_IMAGE``
(CPU image) or ``NASFORGE_GPU_IMAGE`` (GPU image, for stages that need TensorRT/CUDA). Unset, the
tag is the package version, so a release of the package and its images move together.
"""

from __future__ import annotations

import os

from nasforge import __version__

#: Registry and repository prefix of the published images.
DEFAULT_REGISTRY = "ghcr.io/nasforge"
CPU_IMAGE_ENV = "NASFORGE_IMAGE"
GPU_IMAGE_ENV = "NASFORGE_GPU_IMAGE"


def _image(env_var: str, flavour: str) -> str:
    override = os.environ.get(env_var, "").strip()
    if override:
        return override
    return f"{DEFAULT_REGISTRY}/nasforge-{flavour}:{__version__}"


def cpu_image() -> str:
    """Return the CPU image reference (ONNX Runtime + OpenVINO).

    Returns:
        ``$NASFORGE_IMAGE`` if set, else ``ghcr.io/nasforge/nasforge-cpu:<package version>``.
    """
    return _image(CPU_IMAGE_ENV, "cpu")


def gpu_image() -> str:
    """Return the GPU image reference (CUDA runtime + TensorRT) for stages that need a GPU.

    Returns:
        ``$NASFORGE_GPU_IMAGE`` if set, else ``ghcr.io/nasforge/nasforge-gpu:<package version>``.
    """
    return _image(GPU_IMAGE_ENV, "gpu")


if __name__ == "__main__":  # used by scripts/build_images.sh to name what it builds
    print(cpu_image())
    print(gpu_image())
