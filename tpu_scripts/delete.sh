#!/usr/bin/env bash
# Delete the TPU VM or slice (checkpoints live in the run directory you chose).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$TPU_ZONE" --project "$GCLOUD_PROJECT" --quiet
