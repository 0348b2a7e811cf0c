"""Tiny randomly initialised models of every family, built in-process (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
)


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens and an end-of-text token (vocab 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


VOCAB = 257


def tiny_config(family: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=VOCAB - 1,
        )
    if family == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    return decoder_family_config(family)


DECODER_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
"""The decoder families beyond Llama/GPT-2/OPT (issue 30), each a tiny random model of its own architecture."""


def decoder_family_config(family: str):
    """A tiny config of one of :data:`DECODER_FAMILIES`: GQA (4 query heads, 2 KV heads) everywhere; the
    families' own features kept small but present — Qwen2's q/k/v biases, Qwen3's and Gemma's explicit
    head_dim (32, not hidden / heads = 16), Gemma's sliding window (16 positions, shorter than the decode
    tests' prompt + new tokens), Phi-3's fused qkv_proj and gate_up_proj."""
    import transformers as t

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    if family == "qwen2":
        return t.Qwen2Config(**common)
    if family == "qwen3":
        return t.Qwen3Config(**common, head_dim=32)
    if family == "mistral":
        return t.MistralConfig(**common, sliding_window=None)
    if family == "gemma2":
        return t.Gemma2Config(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
    if family == "gemma3":
        return t.Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
    if family == "phi3":
        return t.Phi3Config(**common, pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    with torch.no_grad():  # random init has tiny std; make weights less degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


FAMILIES = ("llama", "gpt2", "opt", "bert")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models (+ byte tokenizer) as local Hugging Face directories, one per family."""
    from core.models import save_hf_dir

    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    tok = byte_tokenizer()
    for fam in FAMILIES:
        d = root / fam
        save_hf_dir(tiny_model(fam), tok, d)
        out[fam] = d
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models of :data:`DECODER_FAMILIES` (+ byte tokenizer), one directory each."""
    from core.models import save_hf_dir

    root = tmp_path_factory.mktemp("family-models")
    tok = byte_tokenizer()
    out = {}
    for fam in DECODER_FAMILIES:
        save_hf_dir(tiny_model(fam), tok, root / fam)
        out[fam] = root / fam
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small .txt corpus: 24 paragraphs separated by blank lines."""
    d = tmp_path_factory.mktemp("text")
    p = d / "corpus.txt"
    paras = [f"Paragraph {i}. " + TEXT * 3 for i in range(24)]
    p.write_text("\n\n".join(paras), encoding="utf-8")
    return p


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(d))
    return d
