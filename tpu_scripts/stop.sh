#!/usr/bin/env bash
# Stop the latest launch on every worker with SIGTERM (the trainer saves a checkpoint, then exits;
# relaunch with --resume to continue), or with --kill at once (no checkpoint).
#
#   TPU_NAME=sql-rl tpu_scripts/stop.sh [--kill] [--dry-run]
#
# The process ids come from REMOTE_DIR/logs/latest.pid, written by launch.sh.
#   --kill      SIGKILL instead of SIGTERM
#   --dry-run   print the gcloud command, run nothing
# Settings: TPU_NAME, TPU_ZONE, GCLOUD_PROJECT, REMOTE_DIR (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "kill" "$@"
((${#ARGS[@]} == 0)) || die_usage "unexpected arguments: ${ARGS[*]}"
require_settings
signal=TERM
[[ -n "${OPT_kill:-}" ]] && signal=KILL
tpu_ssh_all "cd $REMOTE_DIR && kill -$signal \$(cat logs/latest.pid) && echo \"sent SIG$signal on \$(hostname)\""
