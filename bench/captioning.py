"""Captioning speed: lora-studio against transformers on the same machine, with real-size random weights.

Builds BLIP-large (Salesforce/blip-image-captioning-large's architecture) and CLIP ViT-L/14
(openai/clip-vit-large-patch14's) with random weights in a scratch folder, then times
  * transformers: BlipForConditionalGeneration.generate (--beams beams, 3 as `label` by default, 1 for greedy;
    exactly --tokens new tokens) per image, and
    CLIPModel.get_image_features per image (the per-image part of interrogation);
  * lora-studio: `lora-studio label --model FOLDER` over the same images (its "s per image" line).
Random weights never emit [SEP] early when min = max tokens, so both decode the same number of tokens.

Run: python bench/captioning.py [--images 6] [--tokens 20] [--beams 3] [--binary target/release/lora-studio]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, CLIPConfig, CLIPModel


def blip_large(folder):
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
    )
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump({"[DEC]": 30522, "[ENC]": 30523}, f)
    return model


def clip_large(folder):
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def images(folder, count):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        rgb = (np.random.RandomState(i).rand(480, 640, 3) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(folder, f"img{i}.png"))
    return [Image.open(os.path.join(folder, f"img{i}.png")).convert("RGB") for i in range(count)]


def lora_studio(binary, data, model, extra):
    for f in os.listdir(data):
        if f.endswith(".txt") or f == "metadata.csv":
            os.remove(os.path.join(data, f))
    out = subprocess.run([binary, "label", "--input", data, "--sidecars", "--model", model, "--device", "cpu", *extra],
                         capture_output=True, text=True, check=True)
    match = re.search(r"\(([0-9.]+) s per image\)", out.stderr)
    return float(match.group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--binary", default="target/release/lora-studio")
    args = parser.parse_args()
    # The real-size models take 3.3 GB; the folder goes when the run ends.
    with tempfile.TemporaryDirectory(prefix="captioning-bench-") as scratch:
        print(json.dumps(measure(args, scratch)))


def measure(args, scratch):
    """Builds the models and images in `scratch` and times both sides."""
    torch.manual_seed(0)
    blip_dir, clip_dir, data = (os.path.join(scratch, n) for n in ("blip", "clip", "data"))
    blip = blip_large(blip_dir)
    clip = clip_large(clip_dir)
    pictures = images(data, args.images)
    processor = BlipImageProcessor()
    times = []
    with torch.no_grad():
        for picture in pictures:
            pixels = processor(picture, return_tensors="pt").pixel_values
            start = time.perf_counter()
            blip.generate(pixel_values=pixels, num_beams=args.beams, do_sample=False,
                          min_new_tokens=args.tokens, max_new_tokens=args.tokens)
            times.append(time.perf_counter() - start)
    torch_blip = statistics.median(times)
    ours_blip = lora_studio(args.binary, data, blip_dir, ["--min-tokens", str(args.tokens), "--max-tokens", str(args.tokens),
                                                          "--beams", str(args.beams)])
    clip_pixels = torch.randn(1, 3, 224, 224)
    times = []
    with torch.no_grad():
        for _ in pictures:
            start = time.perf_counter()
            clip.get_image_features(pixel_values=clip_pixels)
            times.append(time.perf_counter() - start)
    torch_clip = statistics.median(times)
    ours_clip = lora_studio(args.binary, data, clip_dir, [])
    return {
        "torch_threads": torch.get_num_threads(),
        "blip_beams": args.beams,
        "blip_large_s_per_image": {"transformers": round(torch_blip, 3), "lora_studio": ours_blip,
                                   "ratio": round(ours_blip / torch_blip, 2)},
        "clip_l_s_per_image": {"transformers": round(torch_clip, 3), "lora_studio": ours_clip,
                               "ratio": round(ours_clip / torch_clip, 2)},
    }


if __name__ == "__main__":
    main()
