#!/usr/bin/env bash
# Follow the log of a launch on every worker at once, each line prefixed with its worker's host name.
#
#   TPU_NAME=sql-rl tpu_scripts/logs.sh [--lines N] [--dry-run] [LOG]
#
# LOG is a path relative to REMOTE_DIR (default: the latest launch's, logs/latest on each worker).
# Ctrl-C stops following; the run goes on.
#   --lines N   lines of history to show first (default 20)
#   --dry-run   print the gcloud command, run nothing
# Settings: TPU_NAME, TPU_ZONE, GCLOUD_PROJECT, REMOTE_DIR (see common.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
. "$here/common.sh"
parse_args "lines=" "$@"
((${#ARGS[@]} <= 1)) || die_usage "usage: logs.sh [--lines N] [--dry-run] [LOG]"
lines="${OPT_lines:-20}"
[[ "$lines" =~ ^[0-9]+$ ]] || die_usage "--lines must be a number, got $lines"
require_settings
follow_logs "$lines" "${ARGS[0]:-}"
