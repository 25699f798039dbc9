"""The seeded Llama both GPU and CPU comparisons with TRL build (one definition, so the two
benchmarks measure the same model shape). Imported by scripts run as `python bench/<name>.py`,
whose own folder is on sys.path."""

from __future__ import annotations

from pathlib import Path


def build_model(out: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> Path:
    """A seeded Llama (GQA, untied head) with the tiny task's tokenizer, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubedpo_trainer.tiny import build_tokenizer

    tok = build_tokenizer(out)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out
