#!/usr/bin/env bash
# Delete a TPU VM. Usage: tpu_scripts/delete.sh NAME [ZONE]
set -euo pipefail
name=${1:?usage: delete.sh NAME [ZONE]}
zone=${2:-us-central2-b}
gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
