"""The reference that `lora-studio bench` is compared with: PyTorch + diffusers + peft training a LoRA on
Stable Diffusion 1.5's or SDXL 1.0 base's UNet with random weights, as the diffusers example scripts and
kohya do (f32, AdamW, LoRA on to_q/to_k/to_v/to_out.0, or with `--targets transformer` on every linear layer
of the spatial transformers as kohya's LoRA), with random latents and text embeddings (cached
latents, frozen text encoders; for SDXL also a random pooled text embedding and the size values of an
uncropped image at the bench resolution). `--mixed-precision bf16` trains as those scripts do with
`--mixed_precision bf16`: the frozen UNet in bf16, the LoRA parameters in f32, forward and loss under
`torch.autocast` to bf16 (on the CPU, oneDNN's AMX kernels where the processor has them). Prints one JSON
line with the same field names as `lora-studio bench --json`.

    pip install -r bench/requirements.txt
    python bench/reference_pytorch.py --resolution 256 --steps 3
    python bench/reference_pytorch.py --arch sdxl --resolution 512 --steps 1 --mixed-precision bf16
"""

import contextlib

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

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2,567,463,684 parameters).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


# The layers that get a LoRA, as `lora-studio bench --targets` names them: the diffusers scripts' attention
# projections, or every linear layer of the spatial transformers (kohya's LoRA).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TARGETS = {
    "attention": ATTENTION,
    "transformer": [*ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(UNETS), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="attention")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    bf16 = args.mixed_precision == "bf16"

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = UNETS[args.arch]
    unet = UNet2DConditionModel(**config).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=TARGETS[args.targets],
        )
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if bf16:
        # The diffusers scripts' `weight_dtype`: frozen weights in bf16, trained ones cast back to f32.
        unet.to(dtype=torch.bfloat16)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    adapters = sum(1 for name, _ in unet.named_modules() if name.endswith("lora_A"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    side = args.resolution // 8
    batch = args.batch_size
    latents = torch.randn(batch, 4, side, side, device=device)
    target = torch.randn_like(latents)
    context = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
    timesteps = torch.full((batch,), 500, device=device)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled_width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = [args.resolution, args.resolution]
        added = {
            "text_embeds": torch.randn(batch, pooled_width, device=device),
            # original size, crop top-left, target size
            "time_ids": torch.tensor([size + [0, 0] + size] * batch, dtype=torch.float32, device=device),
        }

    def autocast():
        if bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict():
        with autocast():
            return unet(latents, timesteps, context, added_cond_kwargs=added).sample

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_seconds = []
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            predict()
            sync()
            forward_seconds.append(time.perf_counter() - started)

    step_seconds = []
    unet.train()
    for index in range(args.steps + 1):
        started = time.perf_counter()
        prediction = predict()
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
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
                "arch": args.arch,
                "resolution": args.resolution,
                "batch_size": batch,
                "rank": args.rank,
                "device": args.device,
                "gradient_checkpointing": args.gradient_checkpointing,
                "mixed_precision": args.mixed_precision,
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
