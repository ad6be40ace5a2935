"""Chat templates a mergekit config may name (``chat_template: chatml``), written here as Jinja.

mergekit 0.1.5 ships five named templates. These are our own texts, written to render every
conversation exactly as mergekit's do under transformers' Jinja settings (``trim_blocks``,
``lstrip_blocks``), including their quirks: mergekit's llama3 ends every turn with a newline after
``<|eot_id|>``; its alpaca puts the system message first and no blank line before a generation
prompt; its mistral refuses roles other than user/assistant after an optional system message.
``exaone``'s template is indentation-sensitive and not reproduced: naming it is refused.
"""

from __future__ import annotations

from surgery.errors import RecipeError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is defined %}"
    "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', "
    "'user_context': '### Input:'} %}"
    "{% for message in messages %}"
    "{% if message['role'] in headers %}"
    "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '### Response:\\n' }}{% endif %}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA}
NOT_REPRODUCED = ("exaone",)


def resolve_chat_template(value: str) -> str:
    """mergekit's reading of ``chat_template``: a short single-line name without ``{`` is a named
    template; anything else must be Jinja text (at least 20 characters with a ``{``). ``auto`` is
    resolved by the caller (it needs the inputs)."""
    short_name = len(value) < 256 and "\n" not in value and "{" not in value
    if short_name and value in NAMED:
        return NAMED[value]
    if short_name and value in NOT_REPRODUCED:
        raise RecipeError(
            f"mergekit config: chat_template: {value} is not supported yet",
            hint=f"named templates: {', '.join(NAMED)}; or give the template's Jinja text",
        )
    if len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"mergekit config: invalid chat template {value!r}",
            hint=f"name one of {', '.join(NAMED)}, write auto, or give the template's Jinja text",
        )
    return value
