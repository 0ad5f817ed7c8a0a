#!/usr/bin/env bash
# On the GPU machine: install what is missing there from .device/wheels (it has no network),
# then run the GPU tests (tests/gpu, marker "gpu") and the demo notebook. See docs/gpu.md.
#
#   bash scripts/gpu.sh [--bench | --bench-only] [PYTEST_ARGS...]
#
# --bench also runs the GPU benchmarks after the tests (launch latency and fail-fast against
# accelerate's notebook_launcher, DDP throughput against torchrun): about 10 minutes in all.
# --bench-only runs just the benchmarks (for a device call limited to 10 minutes, split the
# work: one call without a flag, one with --bench-only). Their tables go to $OUT too.
#
# Uses the machine's python3 directly (it holds the CUDA build of torch); $RANKS_PYTHON names
# another. Logs, the JUnit report, the executed notebook and gpu_measurements.json go to $OUT
# (which the device tool brings back) or, without it, to build/gpu-logs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# NVLink multicast stays off: a program using it can put the host's shared GPUs out of
# service. The kernel and the ranks inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1

tests=1 benches=0
case "${1:-}" in
  --bench) benches=1; shift ;;
  --bench-only) tests=0; benches=1; shift ;;
esac

PY=${RANKS_PYTHON:-python3}
wheels=${RANKS_WHEELS:-.device/wheels}
logs=${OUT:-build/gpu-logs}
mkdir -p "$logs"
export RANKS_GPU_REPORT=$logs/gpu_measurements.json

failed=()
run_step() {  # run_step NAME COMMAND...: show and log the output, remember a failure
  local name=$1 started=$SECONDS status
  shift
  echo "==> $name: $*"
  "$@" 2>&1 | tee "$logs/$name.log"
  status=${PIPESTATUS[0]}
  echo "==> $name: exit status $status after $((SECONDS - started)) s"
  [ "$status" -eq 0 ] || failed+=("$name")
  return "$status"
}

# Once nvidia-smi answers, a GPU test that finds no GPU fails instead of skipping.
run_step nvidia-smi nvidia-smi && export RANKS_REQUIRE_GPU=1
run_step python "$PY" -c 'import sys, torch
print(sys.executable, sys.version.split()[0], "torch", torch.__version__,
      "GPUs:", torch.cuda.device_count())'

# ipykernel and friends come from the wheels; torch, cloudpickle, psutil, pytest and
# setuptools are in the image. No index: pip must not try to reach the network.
if ! "$PY" -c 'import ipykernel, jupyter_client, nbclient, nbformat' 2>/dev/null; then
  if [ ! -d "$wheels" ]; then
    echo "error: ipykernel/nbclient are missing and there is no $wheels; make it on the" \
         "development machine (bash ../shared/device/wheels.sh) and carry .device" >&2
    exit 1
  fi
  run_step install-jupyter "$PY" -m pip install -q --no-index --find-links "$wheels" \
    ipykernel jupyter_client nbclient nbformat || exit 1
fi
# --no-build-isolation: an isolated build would fetch setuptools from an index.
echo "==> install-ranks: pip install --no-deps --no-build-isolation -e ."
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 \
    | tee "$logs/install-ranks.log"; then
  echo "==> installing ranks failed: using it from src/ through PYTHONPATH instead"
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$tests" -eq 1 ]; then
  run_step gpu-tests "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider \
    --junitxml="$logs/gpu-junit.xml" "$@"
  run_step demo "$PY" examples/run_notebook.py examples/ddp_demo.ipynb \
    --out "$logs/ddp_demo.executed.ipynb"
fi
if [ "$benches" -eq 1 ]; then
  run_step bench-launch "$PY" bench/launch.py --ns 1,2 --markdown "$logs/launch.md"
  run_step bench-failfast "$PY" bench/failfast.py --repeat 3 --cap 60
  run_step bench-ddp "$PY" bench/ddp_throughput.py --repeats 2 --markdown "$logs/ddp.md"
fi

if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $logs)" >&2
  exit 1
fi
echo "==> all passed (logs in $logs)"
