#!/usr/bin/env bash
# The GPU measurements still owed (issues 19 and 20), cut into stages that each fit one device call
# (10 minutes at most). Run from the repository root on the GPU machine:
#
#   bash benchmarks/h200_stages.sh STAGE [OUT_DIR]
#
# Stages, in the order to run them:
#   tests      every gpu-marked test (fused ops, attention kernels, CUDA graphs, FP8), ~3 min
#   switches   DINOv3 with every issue-19 switch, in a fresh process (a run of 2026-12-03 saw
#              74.7 ms where the same configuration took 33.2 ms minutes before: settle it first)
#   infer      the suite's forward: HF and packvit (FA4, eager and compiled) and the bound, every
#              workload including llava_mix, one model per process
#   train      packvit's training step (FA4, eager and compiled) and its bound, mixed32 and llava_mix
#   fp8        FP8 against bf16 with FA4: model timings and fidelity (benchmarks/fp8_ab.py)
#
# FlashAttention-4, quack and the CUTLASS DSL come unpacked in /tmp/fa4 (the fa4 bundle). They are
# imported through a folder named site-packages: quack fingerprints its GEMM epilogues by the code
# they reach and treats only code under site-packages as pinned by its version; imported from
# /tmp/fa4 itself, the fingerprint walks into the DSL's globals and fails (RESULTS.md, "quack's
# gemm_act runs with the bundle's versions").
set -uo pipefail
stage=${1:?usage: h200_stages.sh tests|switches|infer|train|fp8 [OUT_DIR]}
out=${2:-${OUT:-results-$(date +%F)}}
mkdir -p "$out"
if [[ -d /tmp/fa4 ]]; then
    ln -sfn /tmp/fa4 /tmp/site-packages
    export PYTHONPATH=/tmp/site-packages:/tmp/site-packages/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no /tmp/fa4: FA4 and quack rows will be missing" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
day=$(date +%F)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"

bench() {  # one model per process: each process stays well under the call's limit
    local model=$1; shift
    timeout 170 python -m packvit.bench --model "$model" --backend fa4 --warmup 4 --iters 12 \
        --out "$out/suite-$stage-h200-$day.jsonl" "$@" 2>&1 | tail -n 25
}

case $stage in
tests)
    timeout 560 python -m pytest -q -m gpu -p no:cacheprovider -rs tests/ 2>&1 | tee "$out/gpu-tests-h200-$day.txt" | tail -n 40
    ;;
switches)
    timeout 300 python benchmarks/graphs_ab.py --family dinov3 --switches --max-tokens 8192 \
        --out "$out/graphs-ab-switches-dinov3-h200-$day.jsonl" 2>&1 | tail -n 40
    ;;
infer)
    for model in siglip2 dinov3 aimv2; do
        bench "$model" --mode infer --compile eager compile --impl hf packvit \
            --workload mixed32 fixed32_448 highres video llava_mix
    done
    ;;
train)
    for model in siglip2 dinov3 aimv2; do
        bench "$model" --mode train --compile eager compile --impl packvit --workload mixed32 llava_mix
    done
    ;;
fp8)
    timeout 560 python benchmarks/fp8_ab.py --part models fidelity --backend fa4 \
        --out "$out/fp8-ab-models-fa4-h200-$day.jsonl" 2>&1 | tail -n 40
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
