#!/usr/bin/env bash
# Build jaxreg's LUMIR25 image:  docs/container/build.sh [gpu|cpu] [TAG]
#   ENGINE=podman to build with podman; BUILD_ARGS="..." passes more options to the engine
#   (e.g. BUILD_ARGS="--build-arg BASE_IMAGE=my/python:3.11").
# The engine gets a build context holding the package alone (no virtual environment, data or caches).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
variant=${1:-gpu}
tag=${2:-jaxreg-lumir25:$variant}
case "$variant" in
  gpu) dockerfile=Dockerfile ;;
  cpu) dockerfile=Dockerfile.cpu ;;
  *) echo "usage: $0 [gpu|cpu] [TAG]" >&2; exit 2 ;;
esac
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.so' \
    -cf - pyproject.toml README.md jaxreg cli configs | tar -C "$context" -xf -
cp "$here/$dockerfile" "$context/Dockerfile"
echo "building $tag from $repo ($dockerfile)"
# shellcheck disable=SC2086  # BUILD_ARGS is split on purpose
${ENGINE:-docker} build ${BUILD_ARGS:-} -t "$tag" "$context"
