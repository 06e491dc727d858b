"""A tiny random Llama with its own word-level tokenizer and a text corpus, built offline in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "the",
    "king",
    "queen",
    "castle",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "war",
    "peace",
    "ghost",
    "father",
    "son",
    "daughter",
    "storm",
    "sea",
    "ship",
    "island",
    "magic",
    "spirit",
    "letter",
    "poison",
    "cup",
    "throne",
    "ring",
    "bell",
    "star",
    "moon",
    "sun",
    "wind",
    "rain",
    "fire",
    "earth",
    "heaven",
    "hell",
]


def corpus(n_words: int = 6000, seed: int = 0) -> str:
    """A repetitive but not trivial text: sentences of random words with punctuation."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n_words,), generator=gen).tolist()
    lines, line = [], []
    for i, pick in enumerate(picks):
        line.append(WORDS[pick])
        if i % 9 == 8:
            lines.append(" ".join(line) + ".")
            line = []
    return "\n".join(lines) + "\n"


def build_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0, family: str = "llama",
                     **extra: object) -> Path:
    """Save model (safetensors), config and tokenizer in ``folder``; also ``train.txt`` beside it. ``family`` (a
    ``model_type``) and ``extra`` config entries give another family of the same shape (a tiny Mixtral)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = corpus(seed=seed)
    (folder.parent / "train.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder
