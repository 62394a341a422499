"""The kernels of `cargo bench --bench kernels` in PyTorch, timed the same way (median of 3 runs after a
warm-up; forward without autograd, then forward + `sum().backward()` for the input gradient of an input
that requires one, frozen weights), so each kernel can be compared as a ratio on the same machine:

    cargo bench --bench kernels
    python bench/kernels_reference.py

`--bf16` stores the weights in bf16 and runs under `torch.autocast` to bf16, as the training scripts do
with bf16 mixed precision (compare with `cargo bench --bench kernels -- --bf16`); a word argument runs
only the kernels whose name contains it.
"""

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RUNS = 3


def median_ms(run):
    run()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[RUNS // 2]


BF16 = "--bf16" in sys.argv[1:]
FILTER = next((a for a in sys.argv[1:] if not a.startswith("--")), None)


def precision():
    return torch.autocast("cpu", dtype=torch.bfloat16) if BF16 else contextlib.nullcontext()


def measure(name, dims, f):
    if FILTER is not None and FILTER not in name:
        return
    x = torch.randn(*dims, requires_grad=True)

    def forward():
        with torch.no_grad(), precision():
            f(x)

    def both():
        x.grad = None
        with precision():
            total = f(x).sum()
        total.backward()

    forward_ms, both_ms = median_ms(forward), median_ms(both)
    print(
        f"{name:<44} forward {forward_ms:8.1f} ms   forward+backward {both_ms:8.1f} ms"
        f"   ({both_ms / forward_ms:.1f}x)"
    )


def weight(*dims):
    fan_in = 1
    for d in dims[1:]:
        fan_in *= d
    values = torch.randn(*dims) / fan_in**0.5
    return values.to(torch.bfloat16) if BF16 else values


def attention(x, context, heads):
    batch, tokens, width = x.shape
    split = lambda t: t.view(batch, t.shape[1], heads, width // heads).transpose(1, 2)
    q, k = split(x), split(context)
    return F.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(batch, tokens, width)


def main():
    torch.manual_seed(0)
    if BF16:
        print("bf16 weights, autocast to bf16")
    conv = weight(320, 320, 3, 3)
    for size in [64, 128]:
        measure(
            f"conv 3x3 320->320 at {size}x{size}",
            [1, 320, size, size],
            lambda x: F.conv2d(x, conv, padding=1),
        )
    for channels, size in [(640, 32), (1280, 16)]:
        kernel = weight(channels, channels, 3, 3)
        measure(
            f"conv 3x3 {channels}->{channels} at {size}x{size}",
            [1, channels, size, size],
            lambda x, kernel=kernel: F.conv2d(x, kernel, padding=1),
        )
    # The linear shapes `cargo bench --bench kernels` measures: tokens, inputs, outputs, note.
    shapes = json.loads((Path(__file__).parent / "linear_shapes.json").read_text())
    for tokens, inputs, outputs, note in shapes:
        linear = weight(outputs, inputs)
        measure(
            f"linear {inputs}->{outputs} over {tokens} tokens{note}",
            [1, tokens, inputs],
            lambda x, linear=linear: F.linear(x, linear),
        )
    measure(
        "self-attention, 8 heads, 4096 tokens", [1, 4096, 320], lambda x: attention(x, x, 8)
    )
    measure(
        "self-attention, 10 heads, 4096 tokens (SDXL 1024 px)",
        [1, 4096, 640],
        lambda x: attention(x, x, 10),
    )
    context = torch.randn(1, 77, 320)
    measure(
        "cross-attention, 8 heads, 4096x77 tokens",
        [1, 4096, 320],
        lambda x: attention(x, context, 8),
    )
    group_norm = torch.nn.GroupNorm(32, 320).requires_grad_(False)
    measure("group norm, 32 groups, 320x64x64", [1, 320, 64, 64], group_norm)
    layer_norm = torch.nn.LayerNorm(320).requires_grad_(False)
    measure("layer norm over 4096 tokens x 320", [1, 4096, 320], layer_norm)
    measure("silu, 320x64x64", [1, 320, 64, 64], F.silu)


if __name__ == "__main__":
    main()
