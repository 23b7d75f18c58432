"""Prompt-tuning adapter files (io/prompt.py) as HF PEFT writes them."""
import peft
import pytest
import torch

import ptlm_engine as pe
from tests.helpers import peft_file

pytestmark = [pytest.mark.usefixtures("reference_backend"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_peft_prompt_file_with_empty_modules_to_save_loads(tiny, ids, tmp_path, output):
    """The same for a PROMPT_TUNING file (io/prompt.py read_config -> PromptConfig refuses [])."""
    theirs = peft_file(tiny("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                               modules_to_save=[]), tmp_path)
    expected = output(theirs, ids)
    ours = tiny("llama")
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(output(ours, ids), expected)
