"""Prompt-tuning adapter files (io/prompt.py) as HF PEFT writes them."""
import peft
import pytest
import torch

import ptlm_engine as pe
from tests.helpers import assert_loads_like_peft, peft_file

pytestmark = [pytest.mark.usefixtures("reference_backend"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_peft_prompt_file_with_empty_modules_to_save_loads(tiny, ids, tmp_path, output):
    """PEFT writes modules_to_save=[] as given and reads it as "none"; load_adapter reads a PROMPT_TUNING file's
    empty list as none too (PromptConfig itself refuses []) and computes PEFT's outputs."""
    theirs = peft_file(tiny("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                               modules_to_save=[]), tmp_path)
    assert_loads_like_peft(tiny, "llama", theirs, tmp_path, ids, output, check_peft=False)


def _classifier(kind):
    """A tiny RoBERTa / DistilBERT / BERT sequence classifier (DistilBERT's head is pre_classifier + classifier)."""
    import transformers as T
    torch.manual_seed(0)
    if kind == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
            max_position_embeddings=40, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3, classifier_dropout=0.0)).eval()
    if kind == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=128, max_position_embeddings=40, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3)).eval()
    return T.BertForSequenceClassification(T.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        classifier_dropout=0.0)).eval()


@pytest.mark.parametrize("kind", ["roberta", "distilbert", "bert"])
def test_a_classifier_adapter_without_modules_to_save_loads_in_peft(kind, tmp_path):
    """PEFT's sequence-classification model always keeps a copy of the classifier (every module ending in
    "classifier" or "score") and looks its tensors up in the file: ours files the base classifier's values under
    those keys (and the names in modules_to_save), so PEFT loads it with our outputs, and so do we."""
    import copy
    base = _classifier(kind)
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=3))
    with torch.no_grad():
        ours.ptlm_prompt.prompt_embeddings["a"].normal_(generator=torch.Generator().manual_seed(2))
    pe.save_adapter(ours, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    again = copy.deepcopy(base)
    pe.load_adapter(again, tmp_path, name="a")
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected)
        torch.testing.assert_close(again(input_ids=ids).logits, expected)
