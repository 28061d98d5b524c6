#!/usr/bin/env bash
# Launch one jaxsql command on every host of the slice at once. Each host runs
# the same command; jaxsql calls jax.distributed.initialize() (TPU metadata
# gives the coordinator), reads its own shard of the data and runs its own
# SQL pool.
#   TPU_NAME=sql-rl tpu_scripts/launch.sh train --config rl/recipes/think2sql.yaml data.root=/tmp/jaxsql-dbs
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
[[ $# -ge 1 ]] || { echo "usage: launch.sh JAXSQL_SUBCOMMAND [ARGS...]" >&2; exit 2; }
args="$(printf '%q ' "$@")"
log="run-$(date +%Y%m%d-%H%M%S).log"
tpu_ssh_all "cd $REMOTE_DIR && . .venv/bin/activate && JAXSQL_DISTRIBUTED=1 nohup jaxsql $args > $log 2>&1 & echo started \$(hostname) $log"
