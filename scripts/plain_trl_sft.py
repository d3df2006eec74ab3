"""The plain-TRL baseline of `make bench`: LoRA SFT as a user writes it from TRL's docs, nothing of ours.

Run: python -m scripts.plain_trl_sft --model DIR --data rows.jsonl --out DIR [--steps 40] [--max-length 128]
         [--batch 4] [--lr 3e-2] [--lora-r 8] [--lora-alpha 16] [--seed 42] [--packing] [--padding-free]
Writes DIR/result.json: tokens seen, the trainer's own train_runtime, tokens/s, final loss, load+train seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True), ap.add_argument("--data", required=True), ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40), ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4), ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--lora-r", type=int, default=8), ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--packing", action="store_true", help="TRL's BFD packing (padding-free inside)")
    ap.add_argument("--padding-free", action="store_true", help="padding_free=True; TRL then needs max_length=None")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    # --- as in TRL's quickstart: a conversational dataset, a model path, an SFTConfig, a LoRA config ---
    dataset = load_dataset("json", data_files=args.data, split="train")
    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        logging_steps=1, seed=args.seed, data_seed=args.seed, report_to="none", warmup_steps=0,
        max_length=None if args.padding_free and not args.packing else args.max_length,
        packing=args.packing, padding_free=args.padding_free, assistant_only_loss=True,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda,
        include_num_input_tokens_seen="all",   # counted as our stage counts them (padding included)
    )
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=dataset, peft_config=peft_config)
    metrics = trainer.train().metrics

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen)
    result = {"tokens": tokens, "train_runtime_s": metrics["train_runtime"], "global_step": trainer.state.global_step,
              "tokens_per_s": tokens / metrics["train_runtime"], "load_and_train_s": time.perf_counter() - t0,
              "final_loss": losses[-1] if losses else None, "packing": args.packing, "padding_free": args.padding_free,
              "max_length": config.max_length}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
