"""The kernels of `cargo bench --bench kernels` in PyTorch, timed the same way (median of 3 runs after a
warm-up; forward without autograd, then forward + `sum().backward()` for the input gradient of an input
that requires one, frozen weights), so each kernel can be compared as a ratio on the same machine:

    cargo bench --bench kernels
    python bench/kernels_reference.py
"""

import time

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


def measure(name, dims, f):
    x = torch.randn(*dims, requires_grad=True)

    def forward():
        with torch.no_grad():
            f(x)

    def both():
        x.grad = None
        f(x).sum().backward()

    forward_ms, both_ms = median_ms(forward), median_ms(both)
    print(
        f"{name:<44} forward {forward_ms:8.1f} ms   forward+backward {both_ms:8.1f} ms"
        f"   ({both_ms / forward_ms:.1f}x)"
    )


def weight(*dims):
    fan_in = 1
    for d in dims[1:]:
        fan_in *= d
    return torch.randn(*dims) / fan_in**0.5


def attention(x, context, heads=8):
    batch, tokens, width = x.shape
    split = lambda t: t.view(batch, t.shape[1], heads, width // heads).transpose(1, 2)
    q, k = split(x), split(context)
    return F.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(batch, tokens, width)


def main():
    torch.manual_seed(0)
    conv = weight(320, 320, 3, 3)
    measure("conv 3x3 320->320 at 64x64", [1, 320, 64, 64], lambda x: F.conv2d(x, conv, padding=1))
    for channels, size in [(640, 32), (1280, 16)]:
        kernel = weight(channels, channels, 3, 3)
        measure(
            f"conv 3x3 {channels}->{channels} at {size}x{size}",
            [1, channels, size, size],
            lambda x, kernel=kernel: F.conv2d(x, kernel, padding=1),
        )
    projection = weight(320, 320)
    measure("linear 320->320 over 4096 tokens", [1, 4096, 320], lambda x: F.linear(x, projection))
    geglu = weight(2560, 320)
    measure(
        "linear 320->2560 over 4096 tokens (GEGLU)", [1, 4096, 320], lambda x: F.linear(x, geglu)
    )
    measure("self-attention, 8 heads, 4096 tokens", [1, 4096, 320], lambda x: attention(x, x))
    context = torch.randn(1, 77, 320)
    measure(
        "cross-attention, 8 heads, 4096x77 tokens",
        [1, 4096, 320],
        lambda x: attention(x, context),
    )
    group_norm = torch.nn.GroupNorm(32, 320).requires_grad_(False)
    measure("group norm, 32 groups, 320x64x64", [1, 320, 64, 64], group_norm)
    layer_norm = torch.nn.LayerNorm(320).requires_grad_(False)
    measure("layer norm over 4096 tokens x 320", [1, 4096, 320], layer_norm)
    measure("silu, 320x64x64", [1, 320, 64, 64], F.silu)


if __name__ == "__main__":
    main()
