#!/usr/bin/env bash
# One prepared GPU check (run from the repository root on a machine with a CUDA GPU).
#
# It trains, on CUDA, one epoch of each of: the quickstart recipe; the paper's MNIST CapsNet
# (recipes/capsgan_mnist.toml's model) on 60,000 built-in 28 x 28 glyphs; the report's CIFAR-10
# model with 64 primary types (recipes/capsgan_cifar.toml's model) on 50,000 built-in 32 x 32 RGB
# glyphs (the built-in data needs no download, so the epoch sizes match MNIST's and CIFAR-10's);
# and the plain DCGAN baseline on the same CIFAR-size data; the MNIST-size epoch again reading images
# one at a time as before whole-batch reading (for the ratio); the MNIST-size and CIFAR-size capsule
# epochs with speed.cuda_graphs = true, and again with speed.precision = "tf32" (TF32 matmuls: the test
# accuracy after the epoch beside float32's). It prints the card's name and, per run, the training seconds
# per epoch and images/s from each run's summary.json; then `capsgan bench` on the card: the MNIST
# capsule recipe against its CNN twin, and each [speed] option against the same recipe without it.
#
# Usage: bash benchmarks/gpu.sh [OUT_DIR]    (extra wheels, if the machine lacks a dependency, in .whl/)
# A dry run of the script itself on a CPU: CAPSGAN_GPU_DEVICE=cpu CAPSGAN_GPU_QUICK=1 bash benchmarks/gpu.sh
set -euo pipefail
out="${1:-${OUT:-/tmp/capsgan-gpu}}"
mkdir -p "$out"
site=/tmp/capsgan-site
if [ -z "${CAPSGAN_GPU_QUICK:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
if [ -z "${CAPSGAN_GPU_QUICK:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" . >/dev/null
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The tests that need a real GPU (graphs train as eager mode, "auto" falls back, batches on the device).
if [ -z "${CAPSGAN_GPU_QUICK:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_batch_loading.py -k "real or cuda" \
    || echo "GPU tests FAILED (or pytest missing)"
fi
python3 - "$out" <<'PY'
import json, os, subprocess, sys, time, tomllib
from pathlib import Path
from capsgan_toolkit.recipe.toml_io import dumps_toml

out = Path(sys.argv[1])
def recipe(base, name, data, **extra):
    d = tomllib.loads(Path(base).read_text())
    d["run"].update(name=name, epochs=1, device=os.environ.get("CAPSGAN_GPU_DEVICE", "cuda"), log_every=20)
    if data is not None:
        d["data"] = dict(data)
    if os.environ.get("CAPSGAN_GPU_QUICK"):  # a dry run of this script: two steps on little data
        d["run"].update(steps_per_epoch=2, log_every=1)
        d["data"].update(num_train=512, num_test=64)
    d.setdefault("eval", {})["metrics"] = ["acc"]
    for k, v in extra.items():
        d[k] = v
    p = out / f"{name}.toml"
    p.write_text(dumps_toml(d) + "\n")
    return p
glyphs28 = {"plugin": "glyphs", "image_size": 28, "channels": 1, "num_train": 60000, "num_test": 10000, "batch_size": 128}
glyphs32 = {"plugin": "glyphs", "image_size": 32, "channels": 3, "num_train": 50000, "num_test": 10000, "batch_size": 128}
runs = [
    recipe("recipes/quickstart.toml", "quickstart", None),
    recipe("recipes/capsgan_mnist.toml", "capsnet-mnist-size", glyphs28),
    recipe("recipes/capsgan_cifar.toml", "capsnet-cifar64-size", glyphs32),
    recipe("recipes/dcgan_cifar.toml", "dcgan-cifar-size", glyphs32),
    recipe("recipes/capsgan_mnist.toml", "capsnet-mnist-size-fast", glyphs28,
           speed={"precision": "bf16", "channels_last": True, "cudnn_benchmark": True, "pin_memory": True}),
    recipe("recipes/capsgan_mnist.toml", "capsnet-mnist-size-items", glyphs28),
    recipe("recipes/capsgan_mnist.toml", "capsnet-mnist-size-graphs", glyphs28, speed={"cuda_graphs": True}),
    recipe("recipes/capsgan_cifar.toml", "capsnet-cifar64-size-graphs", glyphs32, speed={"cuda_graphs": True}),
    recipe("recipes/capsgan_mnist.toml", "capsnet-mnist-size-graphs-tf32", glyphs28,
           speed={"cuda_graphs": True, "precision": "tf32"}),
    recipe("recipes/capsgan_cifar.toml", "capsnet-cifar64-size-graphs-tf32", glyphs32,
           speed={"cuda_graphs": True, "precision": "tf32"}),
]
# The last run reads its batches image by image (DataLoader + default collate), as every run did before
# whole-batch reading (capsgan_toolkit.data.batch_loader): the same epoch as capsnet-mnist-size, for the ratio.
ITEMS = ("import sys, capsgan_toolkit.data as d; d.batch_fetcher = lambda dataset, device=None: None; "
         "from capsgan_toolkit.cli.main import main; sys.argv[0] = 'capsgan'; main()")
print(f"{'run':24s} {'batch':>5s} {'s/epoch':>8s} {'img/s':>9s} {'test acc':>8s}  wall")
for p in runs:
    start = time.time()
    cli = ["-c", ITEMS] if p.stem.endswith("-items") else ["-m", "capsgan_toolkit"]
    r = subprocess.run([sys.executable, *cli, "run", str(p), "--out", str(out / p.stem), "--overwrite", "--quiet"],
                       capture_output=True, text=True)
    wall = time.time() - start
    if r.returncode:
        print(p.stem, "FAILED", r.stdout[-2000:], r.stderr[-3000:])
        continue
    s = json.loads((out / p.stem / "summary.json").read_text())
    bs = tomllib.loads(p.read_text())["data"]["batch_size"]
    acc = s.get("test_acc")
    num = lambda v, f: "-" if v is None else format(v, f)
    print(f"{p.stem:24s} {bs:5d} {num(s['seconds_per_epoch'], '8.1f'):>8s} {num(s['images_per_s'], '9.0f'):>9s} "
          f"{'-' if acc is None else f'{acc:.3f}':>8s}  {wall:.0f}s ({s['device']})")
PY
dev="${CAPSGAN_GPU_DEVICE:-cuda}"
steps=20; [ -n "${CAPSGAN_GPU_QUICK:-}" ] && steps=1
bench() { echo "== capsgan bench $*"; python3 -m capsgan_toolkit bench "$@" --device "$dev" --steps "$steps" --warmup 3 \
            --image-shape 1,28,28 --classes 10 || echo "bench FAILED"; }
bench recipes/capsgan_mnist.toml --baseline recipes/cnngan_mnist.toml
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set 'speed.precision="bf16"' --baseline-set 'speed.precision="float32"'
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set speed.channels_last=true --baseline-set speed.channels_last=false
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set speed.cudnn_benchmark=true --baseline-set speed.cudnn_benchmark=false
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set speed.compile=true --baseline-set speed.compile=false
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set speed.cuda_graphs=true --baseline-set speed.cuda_graphs=false
bench recipes/capsgan_mnist.toml --set data.batch_size=128 --set 'speed.precision="tf32"' --baseline-set 'speed.precision="float32"'
