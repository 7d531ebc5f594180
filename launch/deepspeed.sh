#!/usr/bin/env bash
# The DeepSpeed launcher (hostfile-based multi-node). --no_local_rank: the trainer reads
# LOCAL_RANK from the environment, and Hydra would reject a --local_rank argument.
#   launch/deepspeed.sh dist=deepspeed_zero2 trainer.batch_size=4096 trainer.chunk_size=256
#   NUM_GPUS=8 HOSTFILE=/job/hostfile launch/deepspeed.sh dist=deepspeed_zero3 ...
set -euo pipefail
args=(--no_local_rank --num_gpus "${NUM_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
exec deepspeed "${args[@]}" --module train "$@"
