"""The Phi-3 chat format in plain Python (phones have no jinja).

Renders what `microsoft/Phi-3.5-mini-instruct`'s jinja chat template renders:

    <|system|>\\n{content}<|end|>\\n      (only when the system content is not empty)
    <|user|>\\n{content}<|end|>\\n
    <|assistant|>\\n{content}<|end|>\\n
    ... then `<|assistant|>\\n` (generation prompt) or the eos token.

Messages with any other role are skipped, as the template skips them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import PocketLMError

ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TAG = "<|end|>"


def apply_chat_template(
    messages: Iterable[Mapping[str, str]],
    add_generation_prompt: bool = True,
    eos_token: str = "<|endoftext|>",
) -> str:
    """Phi-3 prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    parts = []
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise PocketLMError(f"chat message {i} needs a 'role' and a 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise PocketLMError(f"chat message {i}: content must be text, got {type(content).__name__}")
        if role not in ROLE_TAGS or (role == "system" and not content):
            continue
        parts.append(f"{ROLE_TAGS[role]}\n{content}{END_TAG}\n")
    parts.append("<|assistant|>\n" if add_generation_prompt else eos_token)
    return "".join(parts)
