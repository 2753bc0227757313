#!/usr/bin/env bash
# What a lent GPU should be spent on, as one prepared run (the device tool's `run`):
#
#   1. the blog's two 10-epoch MNIST runs, binary and coloured, and the course's gated
#      class-conditional binary model, with --amp (issue 18's full-run table);
#   2. the GPU benchmark table: training steps and sampling (`report.py --device cuda`);
#   3. the codec across devices: encode on the CPU, decode on the GPU (issue 17's GPU row).
#
# Each part has its own time limit, so that one slow part cannot take the others' time;
# the whole fits one 10-minute call. What it writes goes to $OUT (the device tool
# brings back 8 files): log.txt (everything printed, the benchmark table too) and
# runs.tgz (each run's metrics, curve and sample grids, without checkpoints).
#
# Before the call, here (the data and the wheels travel in ignored folders):
#
#   echo /.mnist/ >> .git/info/exclude && mkdir -p .mnist && cp ../shared/data/mnist/*.gz .mnist/
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl constriction
#
# The call: run(command="bash benchmarks/gpu_session.sh", carry=[".mnist", ".whl"],
# timeout_s=590). On a CPU, SMOKE=1 runs every part for a few steps, to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT" runs
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
DATA=${MNIST_DIR:-.mnist}
SMOKE=${SMOKE:-0}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # the project, with no install step
python3 -c "import torch, maskedconv; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| maskedconv', maskedconv.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

if [ "$SMOKE" = 1 ]; then  # the binary run's 3 steps (its evaluation takes 3 min on a CPU)
    device=cpu; extra=(--max-steps 3 --num-samples 4)
    limit_run=300; limit_more=0; limit_bench=0
else
    device=cuda; extra=(--amp)
    limit_run=120; limit_more=210; limit_bench=120  # with the codec's 30: 570 s in all
fi
common=(--data-dir "$DATA" --no-download --device "$device")

part() {  # part NAME SECONDS COMMAND...: run it under a time limit (0: skip it)
    local name=$1 seconds=$2
    shift 2
    if [ "$seconds" -eq 0 ]; then echo "=== $name: skipped"; return; fi
    echo "=== $name (limit ${seconds} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$seconds" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

part "binary, 10 epochs" "$limit_run" python3 examples/mnist_binary.py "${common[@]}" \
    --out-dir runs/binary "${extra[@]}"
part "colour, 10 epochs" "$limit_more" python3 examples/mnist_color.py "${common[@]}" \
    --out-dir runs/color "${extra[@]}"
part "gated class-conditional binary, 10 epochs" "$((limit_more * 3 / 7))" python3 examples/mnist_binary.py \
    "${common[@]}" --model gated --conditional --out-dir runs/gated_conditional "${extra[@]}"
tar czf "$OUT/runs.tgz" --exclude=checkpoint.pt --exclude=model -C runs \
    binary color gated_conditional 2> /dev/null || echo "=== some runs wrote nothing"

part "benchmarks on the GPU" "$limit_bench" python3 benchmarks/report.py --device cuda \
    -k "test_training_step or (test_sampling and not 8x8) or gated_sampling"

part "codec: encode on the CPU, decode on the GPU" 30 python3 - << 'EOF'
import warnings
import torch
from maskedconv import PixelCNN, codec, sample

torch.manual_seed(0)
model = PixelCNN(1, 2, hidden_channels=64, num_layers=5).eval()
images = sample(model, (64, 1, 28, 28), generator=torch.Generator().manual_seed(1))
data = codec.encode(model, images)
print(f"encoded 64 images on the CPU: {len(data)} bytes")
if not torch.cuda.is_available():
    print("no GPU: the cross-device decode is not tried")
    raise SystemExit(0)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    try:
        decoded = codec.decode(model.cuda(), data)
        same = torch.equal(decoded.cpu(), images)
        print(f"decoded on the GPU: {'every image exact' if same else 'WRONG IMAGES'}")
    except codec.CodecError as error:
        print(f"decoded on the GPU: CodecError, as the docs allow: {error}")
for w in seen:
    print(f"warning: {w.message}")
EOF
echo "=== done"
