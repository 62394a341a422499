"""Runs `lora-studio bench` and the PyTorch reference (bench/reference_pytorch.py) alternately on this
machine and prints a Markdown table of the medians and their ratios (lora-studio / reference; under 1
is faster or smaller). Both get the same architecture, resolution, batch, rank and step count.

    cargo build --release
    python bench/compare.py --resolution 256 --rounds 2 [--gradient-checkpointing]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(command):
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "lora-studio"))
    args = parser.parse_args()

    common = ["--resolution", str(args.resolution), "--steps", str(args.steps), "--rank", str(args.rank)]
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    ours_command = [args.binary, "bench", "--arch", "sd15", "--device", args.device, "--json", *common]
    reference_command = [sys.executable, str(ROOT / "bench" / "reference_pytorch.py"), "--device", args.device, *common]

    ours, reference = [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        ours.append(run(ours_command))
        reference.append(run(reference_command))

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = [
        ("training step (s)", "seconds_per_step"),
        ("forward pass (s)", "forward_seconds"),
        ("peak resident memory (GiB)", "peak_rss_gib"),
    ]
    setting = (
        f"SD 1.5 UNet, {args.resolution} px, batch 1, rank {args.rank} on to_q/to_k/to_v/to_out.0, AdamW, f32, "
        f"{args.device}{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
        f"medians of {args.rounds} alternating runs of {args.steps} steps"
    )
    print(f"{setting}\n")
    print(f"| | lora-studio | {reference[0]['implementation']} | ratio |")
    print("|---|---|---|---|")
    for label, key in rows:
        a, b = median(ours, key), median(reference, key)
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
