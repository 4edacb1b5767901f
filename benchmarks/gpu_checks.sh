#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU, CuPy and numba-cuda:
#
#     bash benchmarks/gpu_checks.sh            # from the project root; results in ./gpu-results
#     STEPS="tests crf" OUT=/tmp/r IMAGE=photo.png bash benchmarks/gpu_checks.sh
#
# With a 10-minute limit per command, run it in two parts:
#     STEPS="tests profile crf conv lessons" bash benchmarks/gpu_checks.sh
#     STEPS="model convbatch train" bash benchmarks/gpu_checks.sh
# and, with time left, STEPS="voc demo" (demo: tinydeeplab demo --device cuda, about as long as
# the CPU demo).
#
# Steps (STEPS, default all): tests — every CUDA test, on the device; profile — where a CRF run's
# time goes (benchmarks/profile_crf.py: steps, kernel launches, the one-launch mean field against
# launch by launch, host profile); crf — the CRF against pydensecrf (skipped, saying so, where
# pydensecrf is not installed); conv — the convolutions against PyTorch's cuDNN; lessons — the
# GPU lessons (14, 15) on the card, with their timings; model — one DeepLab v2 (ResNet-101) training
# step against the PyTorch twin, batch 10 and 2, memory and where ours spends the step
# (bench_model.py --device cuda); convbatch — the convolutions at DeepLab's batch of 10;
# voc — ResNet-101 trained for 20 iterations from torchvision-format (stand-in) weights with
# frozen batch norm on a VOC-layout folder, then evaluated (benchmarks/voc_run.py; VOC=PATH,
# default ../shared/data/voc_mini, skipped saying so where it is missing);
# train — a training run of ours and of the twin on a synthetic set (train_twin.py).  Each
# step has a time limit (LIMIT_<step> seconds overrides it).  profile and
# crf use the photograph IMAGE (default: the shared example beside the checkout, else a
# synthetic scene; they say which).  tinydeeplab must be installed (pip install . — or,
# offline, a wheel made elsewhere with `pip wheel --no-deps .`); each step's output goes to
# $OUT/<step>.txt as well as to the screen.
set -u
STEPS=${STEPS:-tests profile crf conv lessons model convbatch voc train demo}
OUT=${OUT:-gpu-results}
IMAGE=${IMAGE:-}
mkdir -p "$OUT"
status=0

step() {  # step NAME LIMIT COMMAND...: run within LIMIT s, tee the output, note a failure
  local name=$1 limit_var="LIMIT_$1"
  local limit=${!limit_var:-$2}
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

python -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); \
print('GPU:', p['name'].decode(), '| CuPy', cupy.__version__)" | tee "$OUT/device.txt"
export PYTHONWARNINGS=ignore  # numba-cuda warns at every small launch

for s in $STEPS; do
  case $s in
    tests)
      workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
      step tests 300 python -m pytest -q $workers -k "cuda or CUDA or simulator or device or gpu" ;;
    profile)
      step profile 60 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        python benchmarks/profile_crf.py --device cuda --repeat 7 --cprofile \
        ${IMAGE:+--image "$IMAGE"} ;;
    crf)
      if python -c "import pydensecrf" 2>/dev/null; then
        step crf 60 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
          python benchmarks/bench_crf.py --device cuda --repeat 7 ${IMAGE:+--image "$IMAGE"}
      else
        echo "== crf: skipped: pydensecrf is not installed (pip install pydensecrf2)" |
          tee "$OUT/crf.txt"
      fi ;;
    conv)
      step conv 60 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        python benchmarks/bench_conv.py --device cuda --repeat 3 --rounds 2 ;;
    lessons)
      for lesson in lessons/1[45]_*.py; do
        [ -f "$lesson" ] && step "lesson_$(basename "$lesson" .py)" 120 \
          env TDL_OUT="$OUT/lesson_out" python "$lesson"
      done ;;
    model)
      step model 180 python benchmarks/bench_model.py --device cuda --repeat 3 --rounds 3 ;;
    convbatch)
      step convbatch 90 python benchmarks/bench_conv.py --device cuda --repeat 3 --rounds 2 --batch 10 ;;
    voc)
      VOC=${VOC:-../shared/data/voc_mini}
      if [ -d "$VOC" ]; then
        step voc 240 python benchmarks/voc_run.py --data "$VOC" --device cuda \
          --out "$OUT/voc" --backbone resnet101 --iterations 20 --batch-size 2 --crop 161
      else
        echo "== voc: skipped: no VOC-layout folder at $VOC (set VOC=PATH)" | tee "$OUT/voc.txt"
      fi ;;
    train)
      step train 240 python benchmarks/train_twin.py --device cuda --out "$OUT/train_twin" \
        --n-train 800 --n-val 100 --size 192 --crop 161 --batch-size 10 \
        --iterations 1000 --quiet ;;
    demo)
      step demo 540 tinydeeplab demo --device cuda --out "$OUT/demo" ;;
    *)
      echo "unknown step $s (tests, profile, crf, conv, lessons, model, convbatch, voc, train, demo)" >&2
      status=1 ;;
  esac
done
exit $status
