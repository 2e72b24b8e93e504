#!/usr/bin/env bash
# Image entry point: run `clipa-ds ARGS` by default; hand launcher and shell commands through.
#
#   docker run IMAGE plan clipa-v2-h14-84            -> clipa-ds plan clipa-v2-h14-84
#   docker run IMAGE torchrun ... -m clipa_ds.train  -> torchrun ...
#   docker run IMAGE deepspeed ... / python ... / bash
set -euo pipefail

case "${1:-}" in
  "")
    exec clipa-ds --help
    ;;
  torchrun | deepspeed | python | python3 | bash | sh | ds_report | ds_to_universal)
    exec "$@"
    ;;
  *)
    exec clipa-ds "$@"
    ;;
esac
