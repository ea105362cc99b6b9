#!/usr/bin/env bash
# The checks to run when a CUDA device is at hand, in one go (about 7 minutes on an H200):
# the CUDA tests, the optimizer step on ResNet-56 and VGG16-BN shapes with the optimizers built
# in five rotated orders (the first DessiLBI built measures slower, docs/cuda.md), LeNet-3
# iterations (issue 11's target is per iteration: forward + backward + step on a fixed batch,
# interleaved repetitions in one process, three processes) and LeNet-3 epochs with the default
# and with fused=True. Results go to $OUT (default: cuda_check/).
#
#     PYTHONPATH=src bash benchmarks/cuda_check.sh [FASHION_MNIST_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda_check}
data=${1:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py \
    tests/test_optim.py > "$out/tests.txt" 2>&1
echo "tests: exit $?" | tee -a "$out/summary.txt"
for shift in 0 1 2 3 4; do
    timeout 60 python benchmarks/optimizer_step.py --device cuda --reps 60 \
        --build-shift "$shift" --out "$out/step_shift$shift.md" > /dev/null 2>> "$out/errors.txt"
    echo "optimizer_step shift $shift: exit $?" | tee -a "$out/summary.txt"
done
for run in 1 2 3; do
    timeout 60 python -c 'import sys; from dessilbi.cli import main; sys.exit(main())' bench \
        --models lenet3 --steps 300 --channels 1 --image-size 28 --device cuda \
        > "$out/lenet3_iteration$run.md" 2>> "$out/errors.txt"
    echo "bench lenet3 iteration $run: exit $?" | tee -a "$out/summary.txt"
done
for flags in "" "--fused"; do
    timeout 60 python benchmarks/epoch_time.py --model lenet3 --dataset fashion-mnist \
        --data-dir "$data" --device cuda --epochs 5 $flags > "$out/lenet3_epoch${flags}.txt" 2>&1
    echo "epoch_time lenet3 ${flags:-default}: exit $?" | tee -a "$out/summary.txt"
done
