#!/usr/bin/env bash
# Train a recipe on the GPUs of one machine with the DeepSpeed launcher.
#
#   launch/single_node.sh RECIPE [key=value ...]
#   NUM_GPUS=4 launch/single_node.sh clipa-v2-h14-84 run.dir=/ckpt/h14 data.train_urls='s3://b/{000..999}.tar'
#
# Every hyper-parameter lives in the recipe; key=value arguments override it. Nothing here
# but the process layout: NUM_GPUS (default 8) and MASTER_PORT (default 29500).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 RECIPE [key=value ...]" >&2
  exit 2
fi

exec deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" \
  --module clipa_ds.train "$@"
