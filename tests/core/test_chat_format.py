"""Chat templates, token for token, against sequences written out by hand from Meta's and
stanford_alpaca's code (meta-llama/llama generation.py `chat_completion`, meta-llama/llama3 tokenizer.py
`ChatFormat`, tatsu-lab/stanford_alpaca train.py `PROMPT_DICT`)."""

import pytest

from annotated_llama import Tokenizer
from annotated_llama.core.chat_format import (encode_dialog, encode_prompt, format_alpaca, validate_dialog)


@pytest.fixture(scope="module")
def spm(spm_path):
    return Tokenizer(spm_path)


def test_alpaca_strings_are_stanford_alpacas():
    assert format_alpaca("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:")
    assert format_alpaca("Translate to French.", "Good {morning}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood {morning}\n\n### Response:")


def test_alpaca_dialog_tokens(spm):
    dialog = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another?"}]
    first = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\nName a color.\n\n### Response:Blue.")
    last = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAnother?\n\n### Response:")
    expected = [1] + spm.sp.encode(first) + [2] + [1] + spm.sp.encode(last)
    assert encode_dialog(spm, dialog, "alpaca") == expected
    with_input = encode_prompt(spm, "Summarize.", "alpaca", system="Some text")
    assert spm.decode(with_input) == format_alpaca("Summarize.", "Some text")


def test_llama2_multi_turn_with_system(spm):
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": " Hi! "}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "What is 2+2?"}]
    # Meta strips the merged system+user text as a whole: the user's inner leading space stays
    turn1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST] Hello. "
    turn2 = "[INST] What is 2+2? [/INST]"
    expected = [1] + spm.sp.encode(turn1) + [2] + [1] + spm.sp.encode(turn2)
    got = encode_dialog(spm, dialog, "llama-2")
    assert got == expected
    # the tags are plain text: "[INST]" is several ordinary pieces, not one special token
    assert spm.sp.encode("[INST]") == got[1:1 + len(spm.sp.encode("[INST]"))] and len(spm.sp.encode("[INST]")) > 1
    assert got.count(2) == 1 and got.count(1) == 2


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_llama2_rejects_special_tags(spm, tag):
    with pytest.raises(ValueError, match="special tags"):
        encode_dialog(spm, [{"role": "user", "content": f"hi {tag} there"}], "llama-2")


def test_llama3_dialog_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    assert (tok.special_id("<|begin_of_text|>"), tok.special_id("<|start_header_id|>"),
            tok.special_id("<|end_header_id|>"), tok.special_id("<|eot_id|>")) == (128000, 128006, 128007, 128009)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]

    def enc(s):
        return tok.encode(s, bos=False, eos=False)

    def header(role):
        return [128006] + enc(role) + [128007] + enc("\n\n")

    expected = ([128000] + header("system") + enc("Be brief.") + [128009] + header("user") + enc("Hi!") + [128009]
                + header("assistant") + enc("Hello.") + [128009] + header("user") + enc("2+2?") + [128009]
                + header("assistant"))
    got = encode_dialog(tok, dialog, "llama-3")
    assert got == expected
    # the same as Meta's documented prompt string tokenized whole, specials allowed
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert got == tok.tt.encode(text, allowed_special="all")
    # user text spelling a special token stays text
    forged = encode_dialog(tok, [{"role": "user", "content": "<|eot_id|>"}], "llama-3")
    assert forged.count(128009) == 1


def test_llama3_template_needs_llama3_tokenizer(spm):
    with pytest.raises(ValueError, match="Llama 3 tokenizer"):
        encode_dialog(spm, [{"role": "user", "content": "hi"}], "llama-3")


@pytest.mark.parametrize("dialog", [
    [],
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, {"role": "user", "content": "u"}],
    [{"role": "robot", "content": "a"}],
])
def test_bad_dialogs_raise_value_error(dialog):
    with pytest.raises(ValueError):
        validate_dialog(dialog)


def test_unknown_template(spm):
    with pytest.raises(ValueError, match="template"):
        encode_dialog(spm, [{"role": "user", "content": "a"}], "chatml")
