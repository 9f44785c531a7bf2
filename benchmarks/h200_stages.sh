#!/usr/bin/env bash
# The GPU measurements still owed (issues 19 and 20), cut into stages that each fit one device call
# (10 minutes at most). Run from the repository root on the GPU machine:
#
#   bash benchmarks/h200_stages.sh STAGE...        (files go to $OUT, else ./results-DATE)
#
# Stages, in the order to run them (several may share one call: "tests profile"):
#   tests      every gpu-marked test (fused ops, attention kernels, CUDA graphs, FP8), ~3 min
#   profile    where the default eager path's time goes against its bound, per kernel category,
#              mixed32, forward (benchmarks/profile_breakdown.py), ~1 min
#   switches   DINOv3 with every issue-19 switch, in a fresh process (a run of 2026-12-03 saw
#              74.7 ms where the same configuration took 33.2 ms minutes before: settle it first)
#   infer      the suite's forward: HF and packvit (FA4, eager) and the bound on every workload
#              including llava_mix, then packvit compiled on mixed32 and llava_mix; one model per
#              process, ~9 min
#   train      packvit's training step (FA4, eager and compiled) and its bound, mixed32 and llava_mix,
#              ~7 min
#   fp8        FP8 against bf16 with FA4: model timings and fidelity (benchmarks/fp8_ab.py)
#   fp8infer   FP8's input-quantising kernels at several tilings (the producers part), the forward of
#              every family (bf16, FP8, every linear, CUDA graphs), then each family's FP8 profile and
#              host time in a process of its own, ~5 min
#   fp8seeds   FP8 against bf16 training, 200 steps x 3 seeds per family, held-out losses, ~5 min
#   host       the host's side of the eager forward (benchmarks/host_overhead.py): FA4's call routes,
#              host and wall time of the bf16 and FP8 forwards, a host-sync check of the forward and
#              the training step, cProfile of the FP8 forward, ~1.5 min
#   padgraph   SigLIP2's MLP GEMMs with the hidden width padded (fp8_ab.py --part pad); DINOv3's FP8
#              forward eager against one CUDA graph, per kernel (graphs_ab.py --profile), ~2 min
#   ceiling    FP8's ceiling: every linear FP8 with its quantisation free (fp8_ab.py's *_freeq
#              variants), forward and training, beside bf16, the crossovers and every linear, ~5 min
#   fp8train   FP8's training quantisers, the per-shape sweep with both weight-gradient recipes, then
#              the models with FA4 (every variant: crossovers, every linear, CUDA graphs), ~6 min
#
# FlashAttention-4, quack and the CUTLASS DSL come unpacked in /tmp/fa4 (the fa4 bundle). They are
# imported through a folder named site-packages: quack fingerprints its GEMM epilogues by the code
# they reach and treats only code under site-packages as pinned by its version; imported from
# /tmp/fa4 itself, the fingerprint walks into the DSL's globals and fails (RESULTS.md, "quack's
# gemm_act runs with the bundle's versions").
set -uo pipefail
(($#)) || { echo "usage: h200_stages.sh tests|profile|switches|infer|train|fp8|fp8infer|fp8seeds|host|padgraph|ceiling|fp8train ..." >&2; exit 2; }
out=${OUT:-results-$(date +%F)}
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

bench() {  # one model per process, each under its own limit: rows are written as they are timed
    local limit=$1 model=$2; shift 2
    timeout "$limit" python -m packvit.bench --model "$model" --backend fa4 --warmup 4 --iters 12 \
        --out "$out/suite-$stage-h200-$day.jsonl" "$@" 2>&1 | tail -n 12
}

for stage in "$@"; do
echo "== stage $stage, $(date +%T)"
case $stage in
tests)
    timeout 240 python -m pytest -q -m gpu -p no:cacheprovider -rs tests/ 2>&1 | tee "$out/gpu-tests-h200-$day.txt" | tail -n 30
    ;;
profile)
    timeout 100 python benchmarks/profile_breakdown.py --backend fa4 --workload mixed32 \
        --out "$out/profile-fa4-h200-$day.jsonl" 2>&1 | tail -n 50
    ;;
switches)
    timeout 300 python benchmarks/graphs_ab.py --family dinov3 --switches --max-tokens 8192 \
        --out "$out/graphs-ab-switches-dinov3-h200-$day.jsonl" 2>&1 | tail -n 40
    ;;
infer)
    for model in siglip2 dinov3 aimv2; do
        bench 115 "$model" --mode infer --compile eager --impl hf packvit \
            --workload mixed32 llava_mix fixed32_448 highres video
        bench 65 "$model" --mode infer --compile compile --impl packvit --no-bound --workload mixed32 llava_mix
    done
    ;;
train)
    for model in siglip2 dinov3 aimv2; do
        bench 130 "$model" --mode train --compile eager compile --impl packvit --workload mixed32 llava_mix
    done
    ;;
fp8)
    timeout 150 python benchmarks/fp8_ab.py --part models fidelity --backend fa4 \
        --out "$out/fp8-ab-models-fa4-h200-$day.jsonl" 2>&1 | tail -n 40
    ;;
fp8infer)
    timeout 60 python benchmarks/fp8_ab.py --part producers --out "$out/fp8-ab-producers-h200-$day.jsonl" 2>&1 | tail -n 3
    timeout 200 python benchmarks/fp8_ab.py --part models --backend fa4 --variants fp8 fp8_all fp8_graphs bf16_graphs \
        --modes infer --out "$out/fp8-ab-models-infer-fa4-h200-$day.jsonl" 2>&1 | sed -n '/^# summary/,$p'
    for model in siglip2 dinov3 aimv2; do
        timeout 60 python benchmarks/profile_breakdown.py --backend fa4 --model "$model" --fp8 --no-bound \
            --host-profile --top 10 --out "$out/profile-fp8-fa4-h200-$day.jsonl" 2>&1 | grep -E "^\||cProfile|^ +[0-9]"
    done
    ;;
host)
    timeout 200 python benchmarks/host_overhead.py --host-profile --top 20 \
        --out "$out/host-overhead-h200-$day.jsonl" 2>&1 | grep -E "^\||cProfile|^ +[0-9]"
    ;;
fp8seeds)
    timeout 330 python benchmarks/fp8_ab.py --part train --backend fa4 --seeds 0 1 2 \
        --out "$out/fp8-ab-train-seeds-fa4-h200-$day.jsonl" 2>&1 | sed -n '/^# summary/,$p'
    ;;
padgraph)
    timeout 90 python benchmarks/fp8_ab.py --part pad --out "$out/fp8-ab-pad-h200-$day.jsonl" 2>&1 | sed -n '/^# summary/,$p'
    timeout 150 python benchmarks/graphs_ab.py --family dinov3 --fp8 --backend fa4 --workload mixed32 --bucket 23296 \
        --profile --out "$out/graphs-ab-fp8-profile-dinov3-h200-$day.jsonl" 2>&1 | sed -n '/^| family/,$p'
    ;;
ceiling)
    timeout 360 python benchmarks/fp8_ab.py --part models --backend fa4 \
        --variants fp8 fp8_all fp8_all_other_wgrad fp8_all_freeq fp8_all_freeq_other_wgrad \
        --out "$out/fp8-ab-ceiling-fa4-h200-$day.jsonl" 2>&1 | sed -n '/^# summary/,$p'
    ;;
fp8train)
    timeout 480 python benchmarks/fp8_ab.py --part quant sweep models fidelity --backend fa4 \
        --out "$out/fp8-ab-train-fa4-h200-$day.jsonl" 2>&1 | sed -n '/^# summary/,$p'
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
done
