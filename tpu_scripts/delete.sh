#!/usr/bin/env bash
# Tear down: delete the queued resource and its TPU VMs (--force deletes running nodes first).
#
#   TPU_NAME=sql-rl tpu_scripts/delete.sh [--dry-run]
#
# Whatever lives only on the workers' disks (logs, staged databases, a run directory on local
# disk) goes with them: copy it off first, or keep run directories on a bucket.
#   --dry-run   print the gcloud command, run nothing
# Settings: TPU_NAME, QUEUED_RESOURCE, TPU_ZONE, GCLOUD_PROJECT (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "" "$@"
((${#ARGS[@]} == 0)) || die_usage "unexpected arguments: ${ARGS[*]}"
require_settings
run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$TPU_ZONE" \
  --project="$GCLOUD_PROJECT" --force --quiet
