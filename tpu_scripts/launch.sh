#!/usr/bin/env bash
# Run a training command on every worker of a TPU VM or pod slice (multi-host runs need all workers).
# jaxdiff joins the multi-host job itself (jax.distributed.initialize) when TPU_WORKER_HOSTNAMES lists several hosts.
# Usage: tpu_scripts/launch.sh NAME ZONE -- --config configs/sd15_text_to_image.yaml --mesh 8x1
set -euo pipefail
name=${1:?usage: launch.sh NAME ZONE -- TRAIN_FLAGS...}
zone=${2:?usage: launch.sh NAME ZONE -- TRAIN_FLAGS...}
shift 2
[ "${1:-}" = "--" ] && shift
flags=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  cd ~/jaxdiff && . ~/jaxdiff-venv/bin/activate && nohup python -m jaxdiff.train $flags > ~/jaxdiff-train.log 2>&1 &
  echo started on \$(hostname)
"
