# shellcheck shell=bash
# Settings and helpers shared by the Cloud TPU scripts. Sourced, not run.
#
# Settings (environment variables; the scripts' --help says which they use):
#   TPU_NAME         the TPU VM / pod slice (node) name (required)
#   QUEUED_RESOURCE  the queued resource that holds it (default: TPU_NAME)
#   TPU_ZONE         default us-central2-b
#   TPU_TYPE         accelerator type, e.g. v4-32, v5litepod-16, v5p-32, v6e-16 (default v4-8)
#   TPU_VERSION      TPU software (runtime) version; default by generation: v6e v2-alpha-tpuv6e,
#                    v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base
#   GCLOUD_PROJECT   default: gcloud's configured project
#   JAXSQL_REPO      git URL to clone on every worker (empty: ship the local tree)
#   JAXSQL_REF       branch or tag to clone (default main)
#   REMOTE_DIR       working directory on every worker (default jaxsql)
#   DB_LOCAL_DIR     where databases are staged on every worker's local disk (default /tmp/jaxsql-dbs)
#   RUN_ID           names a launch's log file (default: the current time)
#   POLL_SECONDS     how often create.sh asks whether the slice is ready (default 30)
#
# Every script takes --dry-run: print the exact commands it would run (gcloud and local ones),
# one per line, quoted so a shell reads them back as the same arguments, and run nothing.

: "${QUEUED_RESOURCE:=${TPU_NAME:-}}"
: "${TPU_ZONE:=us-central2-b}"
: "${TPU_TYPE:=v4-8}"
: "${JAXSQL_REF:=main}"
: "${JAXSQL_REPO:=}"
: "${REMOTE_DIR:=jaxsql}"
: "${DB_LOCAL_DIR:=/tmp/jaxsql-dbs}"
: "${POLL_SECONDS:=30}"
DRY_RUN=0
ARGS=()

default_runtime_version() {
  case "$TPU_TYPE" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
: "${TPU_VERSION:=$(default_runtime_version)}"

print_help() {
  # The script's header comment, without the leading '# '.
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '/^set -euo pipefail/d' -e 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 1
}

die_usage() {
  echo "error: $*" >&2
  echo "run $(basename "$0") --help for usage" >&2
  exit 2
}

# parse_args "SPEC" "$@": --dry-run and --help, plus the script's own options in SPEC ("name" for a
# flag, "name=" for an option with a value), each setting OPT_<name, '-' as '_'>. Options come first:
# parsing stops at the first other argument (or after "--"), and the rest is left in ARGS.
parse_args() {
  local spec=" $1 " name
  shift
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        print_help
        exit 0
        ;;
      --)
        shift
        break
        ;;
      --*)
        name="${1#--}"
        if [[ "$spec" == *" $name "* ]]; then
          printf -v "OPT_${name//-/_}" '%s' 1
        elif [[ "$spec" == *" $name= "* ]]; then
          (($# >= 2)) || die_usage "$1 needs a value"
          printf -v "OPT_${name//-/_}" '%s' "$2"
          shift
        else
          die_usage "unknown option $1"
        fi
        ;;
      *) break ;;
    esac
    shift
  done
  # shellcheck disable=SC2034  # read by the scripts that source this file
  ARGS=("$@")
}

require_settings() {
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM or pod slice name)"
  if [[ -z "${GCLOUD_PROJECT:-}" ]]; then
    GCLOUD_PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  [[ -n "$GCLOUD_PROJECT" ]] || die "set GCLOUD_PROJECT (no project configured in gcloud)"
}

quote_cmd() {
  # Print the arguments as one command line a shell reads back as the same arguments.
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  # Run a command, or print it under --dry-run.
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    "$@"
  fi
}

tpu_ssh_all() {
  # Run one shell command on every worker of the slice (in parallel).
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --project="$GCLOUD_PROJECT" \
    --worker=all --command="$1"
}

tpu_scp_all() {
  # Copy a local file to a path on every worker.
  run gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" --zone="$TPU_ZONE" --project="$GCLOUD_PROJECT" \
    --worker=all
}

follow_logs() {
  # Follow a log file (relative to REMOTE_DIR; default the latest launch's) on every worker, each
  # line prefixed with its worker's host name, until interrupted.
  local lines="$1" log="${2:-}" file
  if [[ -n "$log" ]]; then
    file="$(printf '%q' "$log")"
  else
    # shellcheck disable=SC2016  # expanded by the worker's shell, not here
    file='"$(cat logs/latest)"'
  fi
  tpu_ssh_all "cd $REMOTE_DIR && tail -n $lines -F $file | sed -u \"s/^/[\$(hostname)] /\""
}
