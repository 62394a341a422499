"""The SDXL numbers of the app's step estimate (src/app/estimate.rs): per pixel, how many operations
SDXL's UNet does and how many activations it keeps for the backward pass, against SD1.5's. Counted, not
timed: the UNets are built on the meta device (no memory, no weights), a forward pass runs under PyTorch's
FlopCounterMode, and saved-tensor hooks add up what autograd keeps when every Linear layer trains (as with
adapters on every linear layer), leaving out the weights and the attention probabilities (the project's
attention keeps none).

    python bench/model_sizes.py
"""

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

SD15 = dict(cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


def measure(config, pixels):
    """(parameters, forward GFLOP, GiB of activations kept for the backward pass) at `pixels` px, batch 1."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor())
    params = {id(p) for p in unet.parameters()}
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.requires_grad_(True)
    latent = pixels // 8
    kwargs = {}
    if "addition_embed_type" in config:
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.zeros(1, 1280, device="meta"),
            time_ids=torch.zeros(1, 6, device="meta"),
        )
    kept = [0]

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        is_weight = id(tensor) in params or id(base) in params
        # Attention probabilities: [batch x heads, queries, keys] with 77 keys or as many as queries.
        is_probs = tensor.dim() == 3 and tensor.shape[-1] in (77, tensor.shape[-2])
        if not (is_weight or is_probs):
            kept[0] += tensor.numel() * 4
        return tensor

    flops = FlopCounterMode(display=False)
    with flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(
            torch.zeros(1, 4, latent, latent, device="meta"),
            torch.zeros(1, device="meta"),
            torch.zeros(1, 77, config["cross_attention_dim"], device="meta"),
            **kwargs,
        )
    count = sum(p.numel() for p in unet.parameters())
    return count, flops.get_total_flops() / 1e9, kept[0] / 2**30


def main():
    _, sd_gflop, sd_gib = measure(SD15, 256)
    params, xl_gflop, xl_gib = measure(SDXL, 1024)
    per_256 = (1024 / 256) ** 2
    print(f"SD1.5 at 256 px: {sd_gflop:.1f} GFLOP, {sd_gib:.3f} GiB kept")
    print(f"SDXL at 1024 px ({params:,} parameters): {xl_gflop:.1f} GFLOP, {xl_gib:.3f} GiB kept")
    print(f"SDXL per pixel / SD1.5 per pixel: operations {xl_gflop / per_256 / sd_gflop:.2f}x, "
          f"activations {xl_gib / per_256 / sd_gib:.2f}x")


if __name__ == "__main__":
    main()
