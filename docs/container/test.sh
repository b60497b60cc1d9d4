#!/usr/bin/env bash
# Run the image exactly as the LUMIR25 organisers do (LUMIR25_Docker_Example/test.sh): one GPU, no
# network, your own user id, the dataset JSON, the images and an output folder mounted under /app.
#   docs/container/test.sh DATASET_JSON INPUT_DIR OUTPUT_DIR [IMAGE [ENTRYPOINT ARGS...]]
#   CPU=1 leaves out --gpus (for the cpu image, or a machine without a GPU); ENGINE=podman;
#   MEMORY=64g changes the memory limit (the organisers give 256g).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DATASET_JSON INPUT_DIR OUTPUT_DIR [IMAGE]" >&2
  exit 2
fi
json=$(realpath "$1")
input=$(realpath "$2")
output=$(realpath -m "$3")
image=${4:-jaxreg-lumir25:gpu}
shift $(( $# < 4 ? $# : 4 ))  # what remains goes to the entrypoint, e.g. --preset lumir-multimodal
mkdir -p "$output"
gpus=(--gpus "device=0")
if [ "${CPU:-0}" = 1 ]; then gpus=(); fi
${ENGINE:-docker} run --rm "${gpus[@]}" --memory "${MEMORY:-256g}" --network=none --user "$(id -u):$(id -g)" \
    --mount type=bind,source="$json",target=/app/LUMIR25_dataset.json,readonly \
    --mount type=bind,source="$input",target=/app/input,readonly \
    --mount type=bind,source="$output",target=/app/output \
    "$image" "$@"
