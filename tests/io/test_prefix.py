"""Prefix-tuning adapter files (io/prefix.py): what HF PEFT's task models expect in them."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import ptlm_engine as pe

pytestmark = [pytest.mark.usefixtures("reference_backend"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_a_classifier_file_holds_the_head_peft_copies(tmp_path):
    """PEFT's sequence-classification model keeps a copy of the head (every module ending in "classifier" or
    "score") and loads it from the file: ours files the base head's values under those keys and names them in
    modules_to_save; loading it back gives the same outputs. (PEFT 0.21 itself refuses prefix tuning of
    transformers 5's classifiers, "Model does not support past key values", so only the layout is checked.)"""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, num_labels=3, pad_token_id=0)).eval()
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        ours.ptlm_prefix.encoders["a"].embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
    pe.save_adapter(ours, "a", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    torch.testing.assert_close(load_file(tmp_path / "adapter_model.safetensors")["base_model.score.weight"],
                               base.score.weight)
    again = copy.deepcopy(base)
    pe.load_adapter(again, tmp_path, name="a")
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours(input_ids=ids).logits)
