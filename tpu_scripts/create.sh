#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.
#   TPU_NAME=sql-rl TPU_TYPE=v4-32 tpu_scripts/create.sh [--spot]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
extra=()
[[ "${1:-}" == "--spot" ]] && extra+=(--spot)
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" \
  --project "$GCLOUD_PROJECT" --accelerator-type "$TPU_TYPE" \
  --version "$TPU_VERSION" "${extra[@]}"
