#!/usr/bin/env bash
# Every GPU figure the speed issue asks for, in one call of the lent GPU machine (about 9 minutes, most
# important first; each step has its own time limit, so a slow one cannot eat the rest).
#
#   run from the repository root there, with the wheels in .whl carried (diffusers 0.42.1, ftfy, wcwidth,
#   importlib_metadata; see benchmarks/README.md), e.g. the device tool's
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Everything printed also goes to $OUT/gpu_session.log (./gpu_session.log without $OUT).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
log=${OUT:-.}/gpu_session.log
file=/tmp/sd_xl_base_random.safetensors  # written by the first step, read by the next two
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"

budget=${BUDGET:-570}  # seconds for the whole script: a step that might not finish in what is left is skipped
step() {  # step SECONDS COMMAND...: run it with a time limit; its output to the screen and the log
    local limit=$1; shift
    if (( SECONDS + limit > budget )); then echo "=== skipped (${SECONDS} of ${budget} s used): $*" | tee -a "$log"; return; fi
    echo "=== $* (limit ${limit} s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log" | grep -v -e Warning -e warn
    echo "=== done in $((SECONDS - start)) s" | tee -a "$log"
}

step 90 python3 benchmarks/startup.py --file "$file" --runs 3             # start-up <= 10 s (writes the file)
step 45 python3 benchmarks/load_memory.py --file "$file" --device cuda --dtypes fp16   # load <= 1.2x read
step 100 python3 benchmarks/gpu_generate.py --runs 3                        # eager, base, 1024: 0.4x target
step 80 python3 benchmarks/gpu_generate.py --fp8 --offload model --runs 1   # <= 4 GiB peak at 1024
step 150 python3 benchmarks/gpu_generate.py --compile --runs 2   # compiled (default mode): 0.65x, warm-up
step 90 python3 benchmarks/gpu_generate.py --refiner --runs 1               # base + refiner, 40 steps
step 80 python3 benchmarks/gpu_generate.py --offload sequential --runs 1    # these two only if time is left
step 100 python3 benchmarks/gpu_generate.py --size 2048 --vae-tiling --offload model --runs 1
grep -e "^ratio" -e "start-up" -e "^| fp16" -e "per image" -e "^pixel" -e "^text context" -e "^final latents" "$log"
