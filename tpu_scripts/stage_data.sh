#!/usr/bin/env bash
# Copy databases and dataset files to local disk on every worker, so each worker's SQL pool reads
# its SQLite files locally (never over a network filesystem).
#
#   TPU_NAME=sql-rl tpu_scripts/stage_data.sh gs://my-bucket/bird [DEST] [--dry-run]
#   TPU_NAME=sql-rl tpu_scripts/stage_data.sh ~/data/bird [DEST]
#
# SOURCE is a gs:// prefix (every worker runs `gcloud storage rsync` from it) or a local directory
# (packed here, copied to every worker, unpacked). DEST defaults to DB_LOCAL_DIR/<name of SOURCE>;
# point the config's data.path at it, e.g. data.path=/tmp/jaxsql-dbs/bird.
#   --dry-run   print the commands (local and gcloud), run nothing
# Settings: TPU_NAME, TPU_ZONE, GCLOUD_PROJECT, DB_LOCAL_DIR (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "" "$@"
((${#ARGS[@]} >= 1 && ${#ARGS[@]} <= 2)) || die_usage "usage: stage_data.sh [--dry-run] SOURCE [DEST]"
require_settings

src="${ARGS[0]%/}"
dest="${ARGS[1]:-$DB_LOCAL_DIR/$(basename "$src")}"
qdest="$(printf '%q' "$dest")"
if [[ "$src" == gs://* ]]; then
  tpu_ssh_all "mkdir -p $qdest && gcloud storage rsync --recursive $(printf '%q' "$src") $qdest && du -sh $qdest"
else
  [[ -d "$src" ]] || die "$src is neither a gs:// prefix nor a local directory"
  tarball="${TMPDIR:-/tmp}/jaxsql-data-$TPU_NAME.tar.gz"
  run tar -C "$src" -czf "$tarball" .
  tpu_scp_all "$tarball" jaxsql-data.tar.gz
  tpu_ssh_all "mkdir -p $qdest && tar -C $qdest -xzf jaxsql-data.tar.gz && rm jaxsql-data.tar.gz && du -sh $qdest"
fi
