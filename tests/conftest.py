"""Shared fixtures: a tiny random Llama with grouped-query attention, and the real default model."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    """2-layer Llama, 4 query heads over 2 K/V heads of dim 16, MLP 96: builds in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama_for(tokenizer, seed: int = 0, layers: int = 2):
    """:func:`tiny_llama` with the embedding resized to ``tokenizer``'s vocabulary."""
    model = tiny_llama(seed, layers)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def tiny_llama_over(tokenizer, seed: int = 0, tied: bool = True):
    """:func:`tiny_llama` built on ``tokenizer``'s vocabulary and special tokens, 2,048
    positions: for tests that generate real text. Untied, its greedy text varies (a tied random
    model repeats the prompt's last token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The packaged model's tokenizer (real vocabulary and chat template), left-padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def default_model_dir():
    """The packaged SmolLM2-135M-Instruct, de-quantised once into the cache."""
    from bonsai_prune.models.loading import dequantised_default

    return dequantised_default()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """:func:`tiny_llama_for` the real tokenizer, saved as a model folder (loads in ~1 s)."""
    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    tiny_llama_for(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A JSONL data file of the first 4 GSM8K train problems."""
    import json

    from bonsai_prune.data.problems import load_gsm8k

    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    rows = [{"question": p.question, "answer": p.answer} for p in load_gsm8k("train")[:4]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
