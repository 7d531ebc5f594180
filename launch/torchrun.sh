#!/usr/bin/env bash
# DDP / FSDP2 / DeepSpeed on one node or several, through torchrun. World size is set here only:
#   NPROC (processes per node, default: the node's GPU count), NNODES (default 1),
#   NODE_RANK and MASTER_ADDR / MASTER_PORT for multi-node.
# Examples:
#   launch/torchrun.sh recipe=quickstart trainer.batch_size=1024 trainer.chunk_size=128
#   launch/torchrun.sh dist=fsdp2 ...      launch/torchrun.sh dist=deepspeed_zero3 ...
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh ...   (and NODE_RANK=1 on node1)
# Preemption: torchrun passes SIGTERM and SIGUSR1/2 on to every rank (--signals-to-handle; by default it
# passes neither USR signal), which gives its step up at the next chunk boundary, checkpoints and exits 143
# (train/preempt.py). SHUTDOWN_TIMEOUT_S (default 120) is how long torchrun then waits before SIGKILL;
# it also bounds how long the surviving ranks get after one rank dies. It must cover one chunk, writing
# a checkpoint and leaving: tools/preempt_timing.py measures it (README, "Preemption").
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}
grace=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}")
if [ "$NNODES" -gt 1 ]; then
  exec torchrun "${grace[@]}" --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" -m train "$@"
fi
exec torchrun "${grace[@]}" --standalone --nproc_per_node "$NPROC" -m train "$@"
