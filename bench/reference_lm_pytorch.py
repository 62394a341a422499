"""The reference that `lora-studio bench --arch qwen2-0.5b` is compared with: PyTorch + transformers + peft
training a LoRA on Qwen2.5-0.5B with random weights, as LLaMA-Factory does with `lora_target: all` (f32,
AdamW, LoRA on q/k/v/o/gate/up/down projections), on random token ids whose next-token loss covers every
position; `--mixed-precision bf16` as with `bf16: true` (frozen weights in bf16, adapters in f32, autocast).
Prints one JSON line with the same field names as `lora-studio bench --arch qwen2-0.5b --json`.

    pip install -r bench/requirements.txt
    python bench/reference_lm_pytorch.py --seq-len 512 --steps 2 [--mixed-precision bf16]
"""

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

# Qwen2.5-0.5B-Instruct's config.json (the shapes; the weights are random).
QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151645,
)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    bf16 = args.mixed_precision == "bf16"

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = Qwen2Config(**QWEN2_0_5B, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device)
    model.requires_grad_(False)
    model = get_peft_model(
        model,
        LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES),
    )
    if bf16:
        # As with `--bf16` in the Trainer-based scripts: frozen weights in bf16, the adapters in f32,
        # forward and loss under autocast.
        model.to(dtype=torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)

    def autocast():
        if bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_seconds = []
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            with autocast():
                model(input_ids=ids, labels=ids).loss.item()
            sync()
            forward_seconds.append(time.perf_counter() - started)

    step_seconds = []
    model.train()
    for index in range(args.steps + 1):
        started = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if index > 0:
            step_seconds.append(time.perf_counter() - started)

    seconds_per_step = statistics.median(step_seconds)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "implementation": f"torch {torch.__version__} + transformers + peft",
                "arch": "qwen2-0.5b",
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "rank": args.rank,
                "device": args.device,
                "mixed_precision": args.mixed_precision,
                "adapters": adapters,
                "trainable_parameters": sum(p.numel() for p in params),
                "threads": torch.get_num_threads(),
                "seconds_per_step": seconds_per_step,
                "step_seconds": step_seconds,
                "forward_seconds": statistics.median(forward_seconds),
                "tokens_per_second": args.batch_size * (args.seq_len - 1) / seconds_per_step,
                "peak_rss_gib": peak_kib / (1024 * 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
