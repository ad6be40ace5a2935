"""Named chat templates: what each renders, written out here (mergekit 0.1.5's files render the same
strings; scripts/mergekit_compare/chat_templates.py compares them on more conversations)."""

from __future__ import annotations

import pytest

from surgery.chat_templates import NAMED, resolve_chat_template
from surgery.errors import RecipeError

chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")

TALK = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
EXPECTED = {
    "chatml": "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nWhat is 2+2?\n<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST]  Be brief. \n\nWhat is 2+2?\n [/INST] 4</s> [INST] And 3+3? [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4\n\n### Instruction:\n"
    "And 3+3?### Response:\n",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates_render(name):
    rendered, _ = chat_utils.render_jinja_template(
        conversations=[TALK], chat_template=resolve_chat_template(name), add_generation_prompt=True,
        bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    assert rendered[0] == EXPECTED[name]


def test_template_names_and_text():
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(text) == text
    with pytest.raises(RecipeError, match="exaone is not supported yet"):
        resolve_chat_template("exaone")
    with pytest.raises(RecipeError, match="invalid chat template"):
        resolve_chat_template("{short}")
