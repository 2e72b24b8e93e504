#!/usr/bin/env bash
# Train a recipe on several machines with the DeepSpeed launcher (pdsh over ssh).
#
#   launch/multi_node.sh HOSTFILE RECIPE [key=value ...]
#
# HOSTFILE lists one machine per line as "hostname slots=8" (see launch/hostfile.example); the
# first one is the rendezvous master unless MASTER_ADDR is set. Run this from the same checkout
# path that exists on every host (a shared file system or the Docker image's /workspace).
#
# Environment for the remote ranks: DeepSpeed forwards NCCL_* and PYTHON* by itself and reads
# KEY=VALUE lines from ./.deepspeed_env (or ~/.deepspeed_env). When ./.deepspeed_env does not
# exist, this script writes one from the variables named in FORWARD_PREFIXES that are set here
# (S3 credentials and endpoint, fsspec and NCCL settings), readable by the owner only, and
# removes it on exit. A hand-written ./.deepspeed_env is used as it is and never touched.
set -euo pipefail

if [[ $# -lt 2 || "$1" == -* ]]; then
  echo "usage: $0 HOSTFILE RECIPE [key=value ...]" >&2
  exit 2
fi
hostfile=$1
shift
if [[ ! -f "$hostfile" ]]; then
  echo "$0: hostfile $hostfile does not exist" >&2
  exit 2
fi

FORWARD_PREFIXES=(AWS_ S3_ FSSPEC_ NCCL_ TORCH_NCCL_ GLOO_ FI_ HF_ CLIPA_)
env_file=.deepspeed_env
created_env_file=0

write_env_file() {
  local name prefix
  (
    umask 077
    : > "$env_file"
  )
  while IFS= read -r name; do
    for prefix in "${FORWARD_PREFIXES[@]}"; do
      if [[ "$name" == "$prefix"* ]]; then
        # DeepSpeed reads one KEY=VALUE per line: multi-line values cannot be forwarded.
        if [[ "${!name}" == *$'\n'* ]]; then
          echo "$0: not forwarding $name (its value spans several lines)" >&2
        else
          printf '%s=%s\n' "$name" "${!name}" >> "$env_file"
        fi
        break
      fi
    done
  done < <(compgen -e | sort)
}

cleanup() {
  if [[ "$created_env_file" == 1 ]]; then
    rm -f "$env_file"
  fi
}
trap cleanup EXIT

if [[ ! -e "$env_file" ]]; then
  created_env_file=1
  write_env_file
fi

master_addr=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ { print $1; exit }' "$hostfile")}
deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  --module clipa_ds.train "$@"
