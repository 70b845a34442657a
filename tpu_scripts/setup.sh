#!/usr/bin/env bash
# Install jaxdiff on every worker of a TPU VM or pod slice, from this checkout.
# Usage: tpu_scripts/setup.sh NAME [ZONE]
set -euo pipefail
name=${1:?usage: setup.sh NAME [ZONE]}
zone=${2:-us-central2-b}
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp --suffix .tar.gz)
git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$name":~/jaxdiff.tar.gz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command '
  set -e
  rm -rf ~/jaxdiff && mkdir -p ~/jaxdiff && tar -xzf ~/jaxdiff.tar.gz -C ~/jaxdiff
  python3 -m venv ~/jaxdiff-venv && . ~/jaxdiff-venv/bin/activate
  pip install -q --upgrade pip
  pip install -q -e "$HOME/jaxdiff[tpu]"
  python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())"
'
