#!/usr/bin/env bash
# Put jaxsql with TPU JAX on every worker of the slice, in REMOTE_DIR/.venv.
#
#   TPU_NAME=sql-rl JAXSQL_REPO=https://github.com/you/jaxsql.git tpu_scripts/setup.sh [--dry-run]
#
# With JAXSQL_REPO set, every worker clones JAXSQL_REF of it; without, the local tree (no .git,
# virtual environments or runs) is packed and copied to every worker. Then each worker makes a
# virtual environment, installs '.[tpu]', and prints its process index and device counts.
#   --dry-run   print the commands (local and gcloud), run nothing
# Settings: TPU_NAME, TPU_ZONE, GCLOUD_PROJECT, JAXSQL_REPO, JAXSQL_REF, REMOTE_DIR (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "" "$@"
((${#ARGS[@]} == 0)) || die_usage "unexpected arguments: ${ARGS[*]}"
require_settings

if [[ -n "$JAXSQL_REPO" ]]; then
  tpu_ssh_all "rm -rf $REMOTE_DIR && git clone --depth 1 -b $(printf '%q' "$JAXSQL_REF") $(printf '%q' "$JAXSQL_REPO") $REMOTE_DIR"
else
  tarball="${TMPDIR:-/tmp}/jaxsql-$TPU_NAME.tar.gz"
  run tar -C "$(cd "$here/.." && pwd)" --exclude=.git --exclude=.venv --exclude=runs --exclude=demo_out -czf "$tarball" .
  tpu_scp_all "$tarball" jaxsql.tar.gz
  tpu_ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf jaxsql.tar.gz"
fi
tpu_ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -U pip && .venv/bin/pip install -e '.[tpu]'"
tpu_ssh_all "cd $REMOTE_DIR && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
