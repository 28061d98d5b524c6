#!/usr/bin/env bash
# Copy databases and dataset files to local disk on every host, so each host's
# SQL pool reads SQLite files locally (never over a network filesystem).
#   TPU_NAME=sql-rl tpu_scripts/stage_data.sh gs://bucket/path/to/data
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
src="${1:?usage: stage_data.sh gs://bucket/path}"
tpu_ssh_all "mkdir -p $DB_LOCAL_DIR && gcloud storage rsync --recursive '$src' $DB_LOCAL_DIR && du -sh $DB_LOCAL_DIR"
