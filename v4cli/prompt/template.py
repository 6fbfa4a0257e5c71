"""The Jinja chat template our GGUFs carry (`tokenizer.chat_template`): it renders what `encoding.render` renders.

GGUF tools (llama-server, LM Studio, llama-cpp-python) build prompts from it; tests/test_chat_template.py checks it
against the encoder byte for byte.
"""

from __future__ import annotations

from importlib.resources import files


def chat_template() -> str:
    """The text of the package asset `v4cli/assets/chat_template.jinja`."""
    return (files("v4cli") / "assets" / "chat_template.jinja").read_text(encoding="utf-8")
