"""Our named chat templates (surgery/chat_templates.py) vs mergekit 0.1.5's files, rendered.

Not part of the test suite (mergekit is no dependency). Renders each template with transformers'
Jinja settings on a set of conversations, with and without a generation prompt, and prints per
name whether every rendering (or raised error) is identical:

    PYTHONPATH=. python scripts/mergekit_compare/chat_templates.py MERGEKIT_PACKAGE_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from surgery.chat_templates import NAMED

U, A, S = "user", "assistant", "system"
CONVERSATIONS = [
    [(U, "Hi there")],
    [(S, " Be brief. "), (U, "What is 2+2?\n"), (A, "4")],
    [(S, "sys"), (U, "What is 2+2?\n"), (A, "4"), (U, "And 3+3?")],
    [(U, "a"), (A, " b "), (U, "c")],
    [(U, "x"), ("user_context", "ctx"), (A, "y")],
    [(S, "one"), (S, "two"), (U, "q")],
    [(A, "starts with the assistant"), (U, "then the user")],
    [(U, "  padded  "), (A, "\nnewlines\n")],
]


def renders(template: str) -> list[str]:
    out = []
    for conv in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            try:
                special = {"bos_token": "<s>", "eos_token": "</s>"}
                text, _ = render_jinja_template(
                    conversations=[messages], chat_template=template, add_generation_prompt=gen, **special
                )
                out.append(text[0])
            except Exception as exc:  # the same refusal counts as the same behaviour
                out.append(f"error: {exc}")
    return out


def main() -> None:
    folder = Path(sys.argv[1]) / "_data" / "chat_templates"
    for name, text in NAMED.items():
        theirs, ours = renders((folder / f"{name}.jinja").read_text()), renders(text)
        same = sum(a == b for a, b in zip(theirs, ours))
        print(f"{name}: {same} of {len(ours)} renderings identical")


if __name__ == "__main__":
    main()
