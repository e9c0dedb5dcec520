#!/usr/bin/env bash
# Build the nasforge container images with docker or podman, whichever can run here.
#
# Usage: scripts/build_images.sh [options] [cpu|gpu|all]      (default: cpu)
#
#   --engine docker|podman|auto   container engine (default auto: a docker with a reachable daemon,
#                                 else podman)
#   --base-image IMAGE            BASE_IMAGE build arg (default: the Dockerfile's public base)
#   --local-base                  build localhost/debian-py:bookworm with debootstrap (root needed;
#                                 once, reused afterwards) and use it as BASE_IMAGE (CPU image only)
#   --rebuild-base                like --local-base, but rebuild the base even if it exists
#   --wheelhouse                  fill docker/wheelhouse with wheels of nasforge and all its
#                                 dependencies (torch CPU included) so the build needs no index
#   --wheelhouse-dir DIR          wheelhouse folder inside the repository (default docker/wheelhouse)
#   --offline                     = --local-base --wheelhouse (no registry, no index needed)
#   --online                      never switch to --offline on its own (see below)
#   --no-cache                    pass --no-cache to the build
#   --dry-run                     print the commands instead of running them
#
# Image names come from one setting, nasforge.images (env NASFORGE_IMAGE / NASFORGE_GPU_IMAGE;
# default ghcr.io/nasforge/nasforge-{cpu,gpu}:<package version>), so the KFP components' base_image
# and what this script tags are the same.
#
# With podman and neither --base-image nor --local-base, the CPU image's public base is pulled;
# if that fails (no registry reachable) the script builds offline, as with --offline.
#
# Podman without a Docker daemon (see DESIGN.md): if CONTAINERS_CONF is unset a containers.conf
# with default_ulimits=[], pids_limit=0 and cgroup_manager=cgroupfs is written and used, and
# builds run with `--runtime runc` (when runc is installed) and `--network host`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

ENGINE="${NASFORGE_CONTAINER_ENGINE:-auto}"
BASE_IMAGE=""
LOCAL_BASE=0
REBUILD_BASE=0
WHEELHOUSE_FILL=0
WHEELHOUSE_DIR="docker/wheelhouse"
NO_CACHE=()
DRY_RUN=0
OFFLINE=auto
TARGET="cpu"
LOCAL_BASE_IMAGE="localhost/debian-py:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

die() { echo "build_images: error: $*" >&2; exit 2; }
log() { echo "build_images: $*" >&2; }
run() {
    if [[ $DRY_RUN == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --engine) ENGINE="${2:?--engine needs a value}"; shift 2 ;;
        --base-image) BASE_IMAGE="${2:?--base-image needs a value}"; shift 2 ;;
        --local-base) LOCAL_BASE=1; shift ;;
        --rebuild-base) LOCAL_BASE=1; REBUILD_BASE=1; shift ;;
        --wheelhouse) WHEELHOUSE_FILL=1; shift ;;
        --wheelhouse-dir) WHEELHOUSE_DIR="${2:?--wheelhouse-dir needs a value}"; shift 2 ;;
        --offline) OFFLINE=yes; shift ;;
        --online) OFFLINE=no; shift ;;
        --no-cache) NO_CACHE=(--no-cache); shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
        cpu|gpu|all) TARGET="$1"; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# The wheelhouse must be inside the build context (the repository) and is passed relative to it.
case "$WHEELHOUSE_DIR" in
    /*) WHEELHOUSE_DIR="$(realpath -m --relative-to="$REPO_ROOT" "$WHEELHOUSE_DIR")" ;;
esac
[[ "$WHEELHOUSE_DIR" == ..* ]] && die "--wheelhouse-dir must be inside $REPO_ROOT"

# Python used for naming the images and for the wheelhouse: the project venv if there is one.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# ---- engine ------------------------------------------------------------------------------------
podman_conf() {
    if [[ -z "${CONTAINERS_CONF:-}" ]]; then
        local conf_dir="${XDG_CACHE_HOME:-$HOME/.cache}/nasforge"
        mkdir -p "$conf_dir"
        cat > "$conf_dir/containers.conf" <<'EOF'
[containers]
default_ulimits = []
pids_limit = 0

[engine]
cgroup_manager = "cgroupfs"
EOF
        export CONTAINERS_CONF="$conf_dir/containers.conf"
    fi
}

ENGINE_CMD=()
BUILD_EXTRA=()
select_engine() {
    if [[ "$ENGINE" == auto ]]; then
        if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
            ENGINE=docker
        elif command -v podman >/dev/null 2>&1; then
            ENGINE=podman
        else
            die "neither a docker daemon nor podman is available (apt-get install -y podman runc)"
        fi
    fi
    case "$ENGINE" in
        docker)
            command -v docker >/dev/null 2>&1 || die "docker is not installed"
            [[ $DRY_RUN == 1 ]] || docker info >/dev/null 2>&1 || die "docker daemon not reachable"
            ENGINE_CMD=(docker)
            BUILD_EXTRA=()
            ;;
        podman)
            command -v podman >/dev/null 2>&1 || die "podman is not installed"
            podman_conf
            ENGINE_CMD=(podman)
            if command -v runc >/dev/null 2>&1; then ENGINE_CMD+=(--runtime runc); fi
            BUILD_EXTRA=(--network host --format docker)
            ;;
        *) die "unknown engine '$ENGINE' (docker, podman or auto)" ;;
    esac
    log "engine: ${ENGINE_CMD[*]}"
}

# ---- local base image (debootstrap) ---------------------------------------------------------
build_local_base() {
    if [[ $REBUILD_BASE == 0 ]] && "${ENGINE_CMD[@]}" image exists "$LOCAL_BASE_IMAGE" 2>/dev/null; then
        log "base $LOCAL_BASE_IMAGE exists; reusing it (--rebuild-base to rebuild)"
        return
    fi
    if [[ "$ENGINE" == docker ]] && [[ $REBUILD_BASE == 0 ]] \
        && docker image inspect "$LOCAL_BASE_IMAGE" >/dev/null 2>&1; then
        log "base $LOCAL_BASE_IMAGE exists; reusing it"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install -y debootstrap)"
    [[ $(id -u) == 0 ]] || die "--local-base needs root (debootstrap)"
    local rootfs
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/nasforge-rootfs.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "rm -rf '$rootfs'" EXIT
    log "debootstrap bookworm (python3 3.11) into $rootfs"
    run debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$rootfs" "$DEBIAN_MIRROR"
    # Shrink the base: apt lists and caches are not needed in an image.
    run rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    if [[ $DRY_RUN == 1 ]]; then
        echo "+ tar -C $rootfs -c . | ${ENGINE_CMD[*]} import - $LOCAL_BASE_IMAGE"
    else
        tar -C "$rootfs" -c . | "${ENGINE_CMD[@]}" import - "$LOCAL_BASE_IMAGE" >/dev/null
    fi
    rm -rf "$rootfs"
    trap - EXIT
    log "built $LOCAL_BASE_IMAGE"
}

# ---- wheelhouse ----------------------------------------------------------------------------------
fill_wheelhouse() {
    local wh="$REPO_ROOT/$WHEELHOUSE_DIR"
    run mkdir -p "$wh"
    local pyver
    pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    [[ "$pyver" == 3.11 ]] || log "warning: wheelhouse built with Python $pyver; the CPU base has 3.11"
    # torch: the CPU build only (PyPI's torch pulls CUDA). A local copy is used when given/present.
    local torch_wheel="${TORCH_WHEEL:-}"
    if [[ -z "$torch_wheel" ]]; then
        torch_wheel="$(find /opt/wheels -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-cp311-*.whl" \
            2>/dev/null | head -n1 || true)"
    fi
    if [[ -n "$torch_wheel" ]]; then
        run cp -f "$torch_wheel" "$wh/"
    else
        run "$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$wh" \
            --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
    fi
    # Everything else (and torch's own dependencies): wheels, built from sdists where needed.
    # The requirements are read from pyproject.toml rather than building nasforge here, which would
    # leave build/ and *.egg-info in the working tree; setuptools/wheel are nasforge's build
    # backend, which the image runs offline.
    local reqs
    reqs="$(mktemp "${TMPDIR:-/tmp}/nasforge-reqs.XXXXXX")"
    "$PYTHON" - "$REPO_ROOT/pyproject.toml" > "$reqs" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["openvino"]))
PY
    printf 'setuptools>=68\nwheel\n' >> "$reqs"
    run "$PYTHON" -m pip wheel --wheel-dir "$wh" --find-links "$wh" -r "$reqs"
    rm -f "$reqs"
    log "wheelhouse $WHEELHOUSE_DIR: $(find "$wh" -maxdepth 1 -name '*.whl' | wc -l) wheels," \
        "$(du -sh "$wh" | cut -f1)"
}

# ---- images --------------------------------------------------------------------------------------
image_name() {  # $1: cpu|gpu
    local names
    names="$(PYTHONPATH="$REPO_ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m nasforge.images)"
    if [[ "$1" == cpu ]]; then sed -n 1p <<<"$names"; else sed -n 2p <<<"$names"; fi
}

build_image() {  # $1: cpu|gpu
    local flavour="$1" name version vcs_ref args start end
    name="$(image_name "$flavour")"
    version="$(PYTHONPATH="$REPO_ROOT/src" "$PYTHON" -c 'import nasforge; print(nasforge.__version__)')"
    vcs_ref="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    args=(--build-arg "VERSION=$version" --build-arg "VCS_REF=$vcs_ref"
          --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
          --build-arg "WHEELHOUSE=$WHEELHOUSE_DIR")
    if [[ "$flavour" == cpu && -n "$BASE_IMAGE" ]]; then args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE"); fi
    if [[ "$flavour" == gpu && -n "${GPU_BASE_IMAGE:-}" ]]; then
        args+=(--build-arg "BASE_IMAGE=$GPU_BASE_IMAGE")
    fi
    log "building $name from docker/Dockerfile.$flavour"
    start=$(date +%s)
    run "${ENGINE_CMD[@]}" build "${BUILD_EXTRA[@]}" "${NO_CACHE[@]}" \
        -f "docker/Dockerfile.$flavour" -t "$name" "${args[@]}" "$REPO_ROOT"
    end=$(date +%s)
    if [[ $DRY_RUN == 0 ]]; then
        local size
        size="$("${ENGINE_CMD[@]}" image inspect --format '{{.Size}}' "$name")"
        log "built $name in $((end - start)) s; size $((size / 1000000)) MB"
    fi
}

# The CPU base can be pulled, or the build goes offline (podman here has no registry at all).
decide_offline() {
    [[ "$OFFLINE" == auto && -z "$BASE_IMAGE" && $LOCAL_BASE == 0 && "$TARGET" != gpu ]] || return 0
    [[ "$ENGINE" == podman && $DRY_RUN == 0 ]] || return 0
    local default_base
    default_base="$(sed -n 's/^ARG BASE_IMAGE=//p' docker/Dockerfile.cpu | head -n1)"
    if "${ENGINE_CMD[@]}" image exists "$default_base" 2>/dev/null \
        || timeout 120 "${ENGINE_CMD[@]}" pull -q "$default_base" >/dev/null 2>&1; then
        return 0
    fi
    log "cannot pull $default_base: building offline (--local-base --wheelhouse)"
    OFFLINE=yes
}

select_engine
decide_offline
if [[ "$OFFLINE" == yes ]]; then LOCAL_BASE=1; WHEELHOUSE_FILL=1; fi
if [[ $LOCAL_BASE == 1 ]]; then
    build_local_base
    [[ -n "$BASE_IMAGE" ]] || BASE_IMAGE="$LOCAL_BASE_IMAGE"
fi
if [[ $WHEELHOUSE_FILL == 1 ]]; then fill_wheelhouse; fi
case "$TARGET" in
    cpu) build_image cpu ;;
    gpu) build_image gpu ;;
    all) build_image cpu; build_image gpu ;;
esac
