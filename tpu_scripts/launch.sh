#!/usr/bin/env bash
# Run a training command on every worker of a TPU VM or pod slice (multi-host runs need all workers).
# jaxdiff joins the multi-host job itself (jax.distributed.initialize finds the other workers of a pod slice).
#
# Every worker must see the same output_dir: process 0 writes the export, config.yaml, metrics and samples, and
# every worker writes its part of each checkpoint and reads it back on resume. jaxdiff writes to local paths only,
# so use a folder mounted at the same path on every worker: a Cloud Storage bucket mounted with gcsfuse, or a
# Filestore/NFS share (a relative output_dir lies under ~/jaxdiff, local to each worker). Before starting, this
# script reads output_dir (from the flags and --config) on worker 0, refuses a gs:// URL, and checks that every
# worker sees a file worker 0 writes there.
#
# Usage: tpu_scripts/launch.sh NAME ZONE -- --config configs/sd15_text_to_image.yaml --output_dir /mnt/runs/sd15
set -euo pipefail
name=${1:?usage: launch.sh NAME ZONE -- TRAIN_FLAGS...}
zone=${2:?usage: launch.sh NAME ZONE -- TRAIN_FLAGS...}
shift 2
[ "${1:-}" = "--" ] && shift
flags=$(printf '%q ' "$@")
setup='cd ~/jaxdiff && . ~/jaxdiff-venv/bin/activate'

on_workers() {  # on_workers WORKER COMMAND: run COMMAND on worker WORKER (a number, or all)
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker="$1" --command "$2"
}

# output_dir as the run will see it (the config is checked on the way); a relative one is under ~/jaxdiff.
resolved=$(on_workers 0 "set -o pipefail && $setup && python -m jaxdiff.train $flags --print_config | python -c '
import sys, yaml
print(\"JAXDIFF_OUTPUT_DIR=\" + yaml.safe_load(sys.stdin)[\"output_dir\"])
'") || { echo "launch.sh: the training flags do not resolve (see above); nothing was started" >&2; exit 2; }
out=$(printf '%s\n' "$resolved" | sed -n 's/^JAXDIFF_OUTPUT_DIR=//p' | tail -n 1)
[ -n "$out" ] || { echo "launch.sh: could not read output_dir from worker 0: $resolved" >&2; exit 2; }
case "$out" in
  *://*)
    echo "launch.sh: --output_dir=$out: jaxdiff writes to local paths only; mount the bucket on every worker" \
      "(gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and pass a folder under the mount" >&2
    exit 2 ;;
esac

# Every worker must see what worker 0 writes into output_dir.
check="$(printf '%q' "$out")/.jaxdiff-shared-check"
token="$(date +%s)-$$-$RANDOM"
on_workers 0 "$setup && mkdir -p $(printf '%q' "$out") && echo $token > $check"
if ! on_workers all "$setup && { [ \"\$(cat $check 2>/dev/null)\" = $token ] || { echo \"output_dir not shared with worker 0: \$(hostname)\"; exit 1; }; }"
then
  on_workers 0 "$setup && rm -f $check"
  echo "launch.sh: --output_dir=$out is not shared by every worker (see above; a relative output_dir lies under" \
    "~/jaxdiff on each worker). Use a folder mounted at the same path on every worker (a gcsfuse-mounted bucket" \
    "or an NFS share); nothing was started" >&2
  exit 2
fi
on_workers 0 "$setup && rm -f $check"

on_workers all "
  $setup && nohup python -m jaxdiff.train $flags > ~/jaxdiff-train.log 2>&1 &
  echo started on \$(hostname)
"
echo "output: $out (logs: ~/jaxdiff-train.log on each worker)"
