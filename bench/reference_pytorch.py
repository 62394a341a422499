"""The reference that `lora-studio bench` is compared with: PyTorch + diffusers + peft training a LoRA on
Stable Diffusion 1.5's UNet with random weights, as the diffusers example scripts and kohya do (f32,
AdamW, LoRA on to_q/to_k/to_v/to_out.0), with random latents and text embeddings (cached latents, frozen
text encoder). Prints one JSON line with the same field names as `lora-studio bench --json`.

    pip install -r bench/requirements.txt
    python bench/reference_pytorch.py --resolution 256 --steps 3
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = UNet2DConditionModel(**SD15_UNET).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    adapters = sum(1 for name, _ in unet.named_modules() if name.endswith("lora_A"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    side = args.resolution // 8
    batch = args.batch_size
    latents = torch.randn(batch, 4, side, side, device=device)
    target = torch.randn_like(latents)
    context = torch.randn(batch, 77, 768, device=device)
    timesteps = torch.full((batch,), 500, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_seconds = []
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            unet(latents, timesteps, context).sample
            sync()
            forward_seconds.append(time.perf_counter() - started)

    step_seconds = []
    unet.train()
    for index in range(args.steps + 1):
        started = time.perf_counter()
        prediction = unet(latents, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if index > 0:
            step_seconds.append(time.perf_counter() - started)

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "implementation": f"torch {torch.__version__} + diffusers + peft",
                "resolution": args.resolution,
                "batch_size": batch,
                "rank": args.rank,
                "device": args.device,
                "gradient_checkpointing": args.gradient_checkpointing,
                "adapters": adapters,
                "trainable_parameters": sum(p.numel() for p in params),
                "threads": torch.get_num_threads(),
                "seconds_per_step": statistics.median(step_seconds),
                "step_seconds": step_seconds,
                "forward_seconds": statistics.median(forward_seconds),
                "peak_rss_gib": peak_kib / (1024 * 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
