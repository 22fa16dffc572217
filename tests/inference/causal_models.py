"""Small generation models built on disk with random weights, for shapes the demo model lacks."""

from pathlib import Path

import torch


def save_windowed_model(tokenizer_dir: Path, path: Path) -> None:
    """Mistral-shaped, random weights, a sliding window of 6 positions."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(3)
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
