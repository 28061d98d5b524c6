#!/usr/bin/env bash
# Install jaxsql with TPU JAX on every host of the slice.
#   TPU_NAME=sql-rl JAXSQL_REPO=https://.../jaxsql.git tpu_scripts/setup.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
if [[ -n "$JAXSQL_REPO" ]]; then
  tpu_ssh_all "rm -rf $REMOTE_DIR && git clone --depth 1 -b $JAXSQL_REF $JAXSQL_REPO $REMOTE_DIR"
else
  # No repository URL: ship the local tree (without virtual environments or runs).
  tarball="$(mktemp --suffix=.tar.gz)"
  tar -C "$here/.." --exclude=.venv --exclude=.git --exclude=runs -czf "$tarball" .
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxsql.tar.gz" --zone "$TPU_ZONE" \
    --project "$GCLOUD_PROJECT" --worker=all
  tpu_ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf jaxsql.tar.gz"
fi
tpu_ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -U pip && pip install -e '.[tpu]'"
tpu_ssh_all "cd $REMOTE_DIR && . .venv/bin/activate && python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
