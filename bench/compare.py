"""Runs `lora-studio bench` and the PyTorch reference alternately on this machine and prints a Markdown
table of the medians and their ratios (lora-studio / reference; under 1 is faster or smaller). Both get
the same architecture, size, batch, rank and step count. `--arch sd15` (default) and `--arch sdxl`
compare with bench/reference_pytorch.py (diffusers + peft), `--arch qwen2-0.5b` with
bench/reference_lm_pytorch.py (transformers + peft). Stops if the two sides train different adapters.

    cargo build --release
    python bench/compare.py --resolution 256 --rounds 2 [--gradient-checkpointing] [--mixed-precision bf16]
    python bench/compare.py --arch sdxl --resolution 512 --steps 1 --rounds 2
    python bench/compare.py --arch qwen2-0.5b --seq-len 512 --steps 2 --rounds 2
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
    parser.add_argument("--arch", choices=["sd15", "sdxl", "qwen2-0.5b"], default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--targets",
        choices=["attention", "transformer"],
        default="attention",
        help="the UNet layers with a LoRA: the attention projections, or every linear layer of the transformers",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        default="no",
        help="bf16: lora-studio's bf16 products (AMX) against PyTorch's bf16 weights under autocast",
    )
    parser.add_argument("--binary", default=str(ROOT / "target" / "release" / "lora-studio"))
    args = parser.parse_args()

    language_model = args.arch == "qwen2-0.5b"
    size = ["--seq-len", str(args.seq_len)] if language_model else ["--resolution", str(args.resolution)]
    common = [*size, "--steps", str(args.steps), "--rank", str(args.rank), "--mixed-precision", args.mixed_precision]
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    if not language_model:
        common += ["--targets", args.targets]
    script = "reference_lm_pytorch.py" if language_model else "reference_pytorch.py"
    ours_command = [args.binary, "bench", "--arch", args.arch, "--device", args.device, "--json", *common]
    arch = [] if language_model else ["--arch", args.arch]
    reference_command = [sys.executable, str(ROOT / "bench" / script), *arch, "--device", args.device, *common]

    ours, reference = [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
        ours.append(run(ours_command))
        reference.append(run(reference_command))
        for key in ("adapters", "trainable_parameters"):
            if ours[-1][key] != reference[-1][key]:
                sys.exit(f"{key}: lora-studio has {ours[-1][key]}, the reference {reference[-1][key]}")

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = [
        ("training step (s)", "seconds_per_step"),
        ("forward pass (s)", "forward_seconds"),
        ("peak resident memory (GiB)", "peak_rss_gib"),
    ]
    if language_model:
        rows.insert(1, ("tokens per second", "tokens_per_second"))
        model = f"Qwen2.5-0.5B, {args.seq_len} tokens, batch 1, rank {args.rank} on q/k/v/o/gate/up/down"
    else:
        unet = {"sd15": "SD 1.5", "sdxl": "SDXL"}[args.arch]
        layers = {
            "attention": "to_q/to_k/to_v/to_out.0",
            "transformer": "every linear layer of the transformers",
        }[args.targets]
        model = f"{unet} UNet, {args.resolution} px, batch 1, rank {args.rank} on {layers}"
    setting = (
        f"{model}, AdamW, {'f32' if args.mixed_precision == 'no' else 'bf16 mixed precision'}, {args.device}{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
        f"medians of {args.rounds} alternating runs of {args.steps} steps; "
        f"{ours[0]['adapters']} adapters, {ours[0]['trainable_parameters']:,} trainable parameters on both sides"
    )
    print(f"{setting}\n")
    print(f"| | lora-studio | {reference[0]['implementation']} | ratio |")
    print("|---|---|---|---|")
    for label, key in rows:
        a, b = median(ours, key), median(reference, key)
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
