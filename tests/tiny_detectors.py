"""Tiny random Grounding DINO and OWLv2 folders, written as the Hub's are (save_pretrained).

The configurations keep each architecture (Swin backbone, BERT text encoder, deformable encoder
and decoder; ViT and CLIP text towers) at toy sizes; the tokenizers are real WordPiece / BPE
tokenizers over small vocabularies written here. Loading goes through the same
``from_pretrained`` path as real weights. Random weights: no claim about detection quality.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WORDS = ["liver", "kidney", "spleen", "left", "right", "tumor", "a", "cat"]


def _bert_vocab() -> list[str]:
    # Grounding DINO hard-codes BERT's ids of [CLS] 101, [SEP] 102, "." 1012 and "?" 1029
    # (its text attention is split at them), so the small vocabulary keeps those positions.
    fixed = {
        0: "[PAD]",
        100: "[UNK]",
        101: "[CLS]",
        102: "[SEP]",
        103: "[MASK]",
        1012: ".",
        1029: "?",
    }
    vocab = [fixed.get(i, f"[unused{i}]") for i in range(1030)]
    return vocab + WORDS + ["##s"]


def bert_tokenizer():
    """A WordPiece tokenizer over :data:`WORDS` with BERT's special-token ids."""
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(_bert_vocab()) + "\n")
        return BertTokenizerFast(str(path), do_lower_case=True)


def clip_tokenizer():
    """A byte-level BPE tokenizer over letters (and "liver" merged) laid out as CLIP's."""
    from transformers import CLIPTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["."]
    vocab: dict[str, int] = {}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    merges = ["l i", "li v", "liv e", "live r</w>"]
    for token in ("li", "liv", "live", "liver</w>"):
        vocab[token] = len(vocab)
    # CLIP's start and end tokens have the two highest ids: OWLv2 pools the text at the
    # highest id and treats a query whose first id is 0 as padding.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizerFast(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16
        )


def write_grounding_dino(folder: Path, *, seed: int = 0, num_queries: int = 40) -> Path:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        SwinConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer()
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=num_queries,
        encoder_n_points=1,
        decoder_n_points=1,
        max_text_len=64,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # A small resize keeps the test fast; the real model's is 800 / 1333.
    GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(
        folder
    )
    return folder


def write_owlv2(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    n = len(tokenizer)
    config = Owlv2Config(
        text_config=dict(
            vocab_size=n,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            image_size=64,
            patch_size=16,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Owlv2ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder
