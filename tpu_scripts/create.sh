#!/usr/bin/env bash
# Create a TPU VM (or pod slice).
# Usage: tpu_scripts/create.sh NAME [ZONE] [ACCELERATOR_TYPE] [RUNTIME_VERSION]
#   e.g. tpu_scripts/create.sh jaxdiff-v5e us-west4-a v5litepod-8 v2-alpha-tpuv5-lite
set -euo pipefail
name=${1:?usage: create.sh NAME [ZONE] [ACCELERATOR_TYPE] [RUNTIME_VERSION]}
zone=${2:-us-central2-b}
accelerator=${3:-v4-8}
runtime=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$runtime"
