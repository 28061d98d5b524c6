#!/usr/bin/env bash
# Launch one jaxsql command on every worker of the slice at once, in the background.
#
#   TPU_NAME=sql-rl tpu_scripts/launch.sh [--follow] [--dry-run] JAXSQL_SUBCOMMAND [ARGS...]
#   TPU_NAME=sql-rl tpu_scripts/launch.sh --follow train --config rl/recipes/think2sql.yaml data.path=/tmp/jaxsql-dbs/bird
#
# Each worker runs the same command with JAXSQL_DISTRIBUTED=1: jaxsql calls
# jax.distributed.initialize(), which reads the coordinator address, the number of processes and
# this worker's process id from the TPU metadata (elsewhere set JAXSQL_COORDINATOR,
# JAXSQL_NUM_PROCESSES and JAXSQL_PROCESS_ID instead). Each process reads its own slice of the data
# and runs its own SQL pool on its local copy of the databases (stage_data.sh).
# Output goes to REMOTE_DIR/logs/run-RUN_ID.log on each worker; logs/latest names it and
# logs/latest.pid holds the process id (for stop.sh).
#   --follow    then follow the logs of all workers (logs.sh); Ctrl-C stops following, not the run
#   --dry-run   print the gcloud commands, run nothing
# Script options go before the jaxsql subcommand; everything from the subcommand on is jaxsql's.
# Settings: TPU_NAME, TPU_ZONE, GCLOUD_PROJECT, REMOTE_DIR, RUN_ID (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "follow" "$@"
((${#ARGS[@]} >= 1)) || die_usage "usage: launch.sh [--follow] [--dry-run] JAXSQL_SUBCOMMAND [ARGS...]"
require_settings

: "${RUN_ID:=$(date +%Y%m%d-%H%M%S)}"
log="logs/run-$RUN_ID.log"
args="$(printf '%q ' "${ARGS[@]}")"
tpu_ssh_all "cd $REMOTE_DIR && mkdir -p logs && echo $log > logs/latest && { JAXSQL_DISTRIBUTED=1 nohup .venv/bin/jaxsql ${args% } > $log 2>&1 < /dev/null & echo \$! > logs/latest.pid; } && echo \"started on \$(hostname): $REMOTE_DIR/$log\""
if [[ -n "${OPT_follow:-}" ]]; then
  follow_logs 20 "$log"
fi
