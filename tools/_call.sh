#!/bin/bash
export PYTHONPATH=. HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CUDA_VISIBLE_DEVICES=0,1 timeout 170 python tools/bench.py pipeline --preset e4b --pp 2 --batch 8 --prompt-len 128 \
  --gen-len 64 --repeat 1 --json $OUT/pipeline_e4b.json > /tmp/pe.log 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout 170 python tools/bench.py pipeline --preset 26b-a4b --pp 2 --batch 8 --prompt-len 128 \
  --gen-len 64 --repeat 1 --json $OUT/pipeline_26b-a4b.json > /tmp/p26.log 2>&1 &
wait
grep "^\[" /tmp/pe.log; grep "^\[" /tmp/p26.log; tail -3 /tmp/pe.log /tmp/p26.log | cut -c1-300
