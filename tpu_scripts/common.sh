# Shared settings for the Cloud TPU scripts. Override any of them in the
# environment. Sourced, not run.
: "${TPU_NAME:?set TPU_NAME (the TPU VM or pod slice name)}"
: "${TPU_ZONE:=us-central2-b}"
: "${TPU_TYPE:=v4-8}"
: "${TPU_VERSION:=tpu-ubuntu2204-base}"
: "${GCLOUD_PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${JAXSQL_REF:=main}"
: "${JAXSQL_REPO:=}"          # git URL of your jaxsql checkout, or empty to copy the local tree
: "${REMOTE_DIR:=jaxsql}"      # working directory on every host
: "${DB_LOCAL_DIR:=/tmp/jaxsql-dbs}"  # where databases are staged on local disk

tpu_ssh_all() {
  # Run one command on every host of the slice.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" \
    --project "$GCLOUD_PROJECT" --worker=all --command "$1"
}
