"""Makes what the README's language-model training run uses, since no model can be downloaded here: a model
folder with Qwen2.5-0.5B's real shapes (494 M parameters: 24 layers, hidden 896, 14 heads, 2 key/value heads,
intermediate 4864, vocabulary 151,936, tied embeddings) and random weights as transformers initialises them
(bf16), with the tiny test tokenizer and Qwen's chat template (tests/fixtures/causal_lm/qwen2: its token ids
stay below the real vocabulary), and a generated dialogue dataset in OpenAI's messages format: a shop's
support desk answering in one house style.

    python bench/make_chat_run.py OUT_DIR [--conversations 300]
    lora-studio train --config OUT_DIR/train.toml
"""

import argparse
import json
import pathlib
import random
import shutil

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "causal_lm" / "qwen2"

PRODUCTS = ["kettle", "desk lamp", "rain jacket", "coffee grinder", "backpack", "phone stand", "wool scarf"]
QUESTIONS = [
    ("Where is my {p}?", "Thanks for waiting! Your {p} left our warehouse {d} and should reach you within {n} days."),
    ("Can I return the {p}?", "Of course! The {p} can come back within {n} days; we send you a free label {d}."),
    ("My {p} arrived broken.", "We are so sorry! A new {p} goes out {d}, and you can keep or recycle the old one."),
    ("Do you ship the {p} abroad?", "Yes! The {p} ships to {n} countries; the price at checkout includes duties."),
    ("Is the {p} in stock?", "Good news! The {p} is back in stock {d}, and we hold one for you for {n} days."),
]
WHEN = ["today", "tomorrow", "this morning", "on Monday", "yesterday evening"]


def conversations(count, rng):
    rows = []
    for _ in range(count):
        turns = []
        for _ in range(rng.choice([1, 1, 2])):
            question, answer = rng.choice(QUESTIONS)
            fill = dict(p=rng.choice(PRODUCTS), d=rng.choice(WHEN), n=rng.randint(2, 30))
            turns += [
                {"role": "user", "content": question.format(**fill)},
                {"role": "assistant", "content": answer.format(**fill) + " Anything else, just ask. - Mia"},
            ]
        rows.append({"messages": turns})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--conversations", type=int, default=300)
    args = parser.parse_args()
    model_dir = args.out / "qwen2.5-0.5b-shaped"
    model_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=300, eos_token_id=302,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        shutil.copy(TOKENIZER / name, model_dir / name)

    data_dir = args.out / "support-chats"
    data_dir.mkdir(exist_ok=True)
    rows = conversations(args.conversations, random.Random(0))
    (data_dir / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "train.toml").write_text(
        f'base_model = "{model_dir}"\n'
        f'train_data_dir = "{data_dir}"\n'
        f'output_dir = "{args.out / "run"}"\n'
        'output_name = "mia"\n'
        "lora_rank = 16\nlora_alpha = 32\nlearning_rate = 2e-4\nbatch_size = 2\n"
        "max_train_steps = 50\nmax_seq_length = 128\nsave_steps = 25\nseed = 1\n"
    )
    print(f"{model_dir}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(rows)} conversations")


if __name__ == "__main__":
    main()
