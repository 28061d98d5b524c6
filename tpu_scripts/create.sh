#!/usr/bin/env bash
# Request a Cloud TPU VM or pod slice as a queued resource and wait until it is ACTIVE.
#
#   TPU_NAME=sql-rl TPU_TYPE=v5p-32 tpu_scripts/create.sh [--spot] [--no-wait] [--dry-run]
#
# Queued resources are how current TPU generations (v5e, v5p, v6e) are provisioned, and they
# serve v4 too. The request is QUEUED_RESOURCE (default TPU_NAME); its TPU node is TPU_NAME.
#   --spot      Spot capacity: cheaper, preemptible (the trainer saves a checkpoint on SIGTERM;
#               relaunch with --resume)
#   --no-wait   return once the request is queued instead of polling until it is ACTIVE
#   --dry-run   print the gcloud commands, run nothing
# Settings: TPU_NAME, QUEUED_RESOURCE, TPU_ZONE, TPU_TYPE, TPU_VERSION, GCLOUD_PROJECT,
# POLL_SECONDS (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "spot no-wait" "$@"
((${#ARGS[@]} == 0)) || die_usage "unexpected arguments: ${ARGS[*]}"
require_settings

extra=()
[[ -n "${OPT_spot:-}" ]] && extra+=(--spot)
run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
  --zone="$TPU_ZONE" --project="$GCLOUD_PROJECT" --accelerator-type="$TPU_TYPE" \
  --runtime-version="$TPU_VERSION" "${extra[@]}"
[[ -n "${OPT_no_wait:-}" ]] && exit 0

state_cmd=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$TPU_ZONE"
  --project="$GCLOUD_PROJECT" --format='value(state.state)')
if ((DRY_RUN)); then
  quote_cmd "${state_cmd[@]}"
  echo "# (repeated every ${POLL_SECONDS}s until the state is ACTIVE; FAILED or SUSPENDED stops with an error)"
  exit 0
fi
while true; do
  state="$("${state_cmd[@]}")"
  case "$state" in
    ACTIVE)
      echo "queued resource $QUEUED_RESOURCE is ACTIVE: TPU $TPU_NAME ($TPU_TYPE) is ready"
      exit 0
      ;;
    FAILED | SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state (gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$TPU_ZONE)" ;;
  esac
  echo "queued resource $QUEUED_RESOURCE: ${state:-unknown}; checking again in ${POLL_SECONDS}s" >&2
  sleep "$POLL_SECONDS"
done
