#!/usr/bin/env bash
# Checks and times the CUDA build on a machine with an NVIDIA GPU and no network, in one run:
#   1. a 10-step DDIM generation of the tiny SD1 fixture on the GPU against the diffusers reference image;
#   2. `lora-studio bench` on the GPU at 512 px (a tiny model first, to fail fast);
#   3. bench/compare.py on the GPU against PyTorch + diffusers + peft at 512 px.
#
# Usage: bench/gpu_check.sh BINARY WHEELS OUT
#   BINARY  lora-studio built with `--features cuda` (may be .xz-compressed)
#   WHEELS  a folder of wheels for what the machine's Python lacks (diffusers), installed without an index
#   OUT     a folder for the results (generation.png, bench.json, compare.md)
# DEVICE, RESOLUTION, STEPS and ROUNDS override cuda, 512, 5 and 2 (DEVICE=cpu RESOLUTION=256 STEPS=1
# ROUNDS=1 rehearses the whole run on a machine without a GPU).
# The CUDA libraries (cuBLAS, cuRAND, the runtime) are taken from the Python environment's `nvidia`
# packages when they are not on the library path already. README's "Building" says how to build BINARY
# for a CUDA 13 machine from one without a GPU.
set -euo pipefail

binary=$1
wheels=$2
out=$3
root=$(cd "$(dirname "$0")/.." && pwd)
device=${DEVICE:-cuda}
resolution=${RESOLUTION:-512}
steps=${STEPS:-5}
rounds=${ROUNDS:-2}
mkdir -p "$out"

if [[ $binary == *.xz ]]; then
    xz -d -c "$binary" >"$out/lora-studio"
    chmod +x "$out/lora-studio"
    binary=$out/lora-studio
fi

nvidia_libs=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "libcublas.so.*"), recursive=True):
        dirs.add(os.path.dirname(lib))
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "libcurand.so.*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH=${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi -L || true
ldd "$binary" | grep -E "cu|nv" || true

echo "== 1. generation on $device against the diffusers reference"
python3 - "$root" "$out" <<'EOF'
import sys
from safetensors.numpy import load_file, save_file
from safetensors import safe_open
root, out = sys.argv[1], sys.argv[2]
reference = f"{root}/tests/fixtures/sd1_reference.safetensors"
noise = load_file(reference)["ddim.init_noise"].astype("float32")
save_file({"latents": noise}, f"{out}/noise.safetensors")
with safe_open(reference, "np") as f:
    open(f"{out}/prompt.txt", "w").write(f.metadata()["pipeline.prompt"])
EOF
"$binary" generate --device "$device" --base "$root/tests/fixtures/sd1" --prompt "$(cat "$out/prompt.txt")" \
    --scheduler ddim --steps 10 --cfg 7.5 --width 64 --height 64 \
    --init-noise "$out/noise.safetensors" --out "$out/generation.png"
python3 - "$root" "$out" <<'EOF'
import sys
import numpy as np
from PIL import Image
root, out = sys.argv[1], sys.argv[2]
ours = np.asarray(Image.open(f"{out}/generation.png").convert("RGB"), dtype=int)
expected = np.asarray(Image.open(f"{root}/tests/fixtures/sd1_ddim.png").convert("RGB"), dtype=int)
worst = int(np.abs(ours - expected).max())
print(f"generation: pixels differ from the reference by up to {worst}/255 (2 or less passes)")
EOF

echo "== 2. lora-studio bench on $device"
"$binary" bench --arch tiny --device "$device" --steps 2
"$binary" bench --device "$device" --resolution "$resolution" --steps "$steps" --json |
    tee "$out/bench.json"

echo "== 3. against PyTorch + diffusers + peft on the same $device"
python3 -m pip install --no-index --no-deps --target "$out/python" "$wheels"/*.whl >/dev/null
PYTHONPATH="$out/python${PYTHONPATH:+:$PYTHONPATH}" python3 "$root/bench/compare.py" --device "$device" \
    --resolution "$resolution" --rounds "$rounds" --steps "$steps" --binary "$binary" | tee "$out/compare.md"
