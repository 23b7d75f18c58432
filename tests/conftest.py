"""Shared fixtures: tiny Llama / GPT-2 / BERT models built from configs with random weights, their inputs,
and the reference backend for tests that check the layers rather than the kernels.

The models have no dropout of their own, so train-mode outputs are deterministic and comparable."""
import copy
import warnings

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from tests.helpers import randomize_trainable

VOCAB = 128


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def _bert_config():
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=VOCAB, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


BUILDERS = {
    "llama": _llama,
    "gpt2": _gpt2,
    "bert": lambda: BertModel(_bert_config()),
    "bert_cls": lambda: BertForSequenceClassification(_bert_config()),
}


@pytest.fixture(scope="session")
def _pristine():
    """One randomly initialised model per kind, built once; tests get deep copies."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {kind: build().eval() for kind, build in BUILDERS.items()}


@pytest.fixture
def tiny(_pristine):
    """tiny(kind) -> a fresh copy of that tiny model (same weights every call), in eval mode."""
    return lambda kind: copy.deepcopy(_pristine[kind])


@pytest.fixture
def ids():
    """(batch 2, 8 tokens) of token ids."""
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


@pytest.fixture
def output():
    """output(model, ids) -> the model's main output tensor: logits, or a bare encoder's last hidden state."""
    def main_output(model, ids):
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state
    return main_output


@pytest.fixture
def randomize_adapters():
    """randomize_adapters(model, seed=0): random values in every trainable tensor (LoRA B starts at zero, so a
    fresh adapter changes nothing)."""
    return randomize_trainable
