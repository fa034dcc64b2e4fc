"""The chat format shared by SFT, RAG, the alignment stages and the server.

A conversation renders as::

    <|bos|><|context|>retrieved text<|end|><|user|>question<|end|><|assistant|>answer<|end|><|eos|>

The context turn is optional. Special-token strings are the single source of truth for the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CONTEXT = "<|context|>"
END = "<|end|>"

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER, ASSISTANT, CONTEXT, END)
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT, "context": CONTEXT}


@dataclass(frozen=True)
class Message:
    role: str  # "user", "assistant" or "context"
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLE_TOKENS:
            raise ValueError(f"message role {self.role!r} is not one of {sorted(ROLE_TOKENS)}")


def as_messages(messages: list[Message] | list[dict]) -> list[Message]:
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]


def render_prompt(messages: list[Message] | list[dict], context: str | None = None) -> str:
    """Text up to and including the assistant tag, ready for generation."""
    parts = [BOS]
    if context:
        parts.append(f"{CONTEXT}{context}{END}")
    for m in as_messages(messages):
        parts.append(f"{ROLE_TOKENS[m.role]}{m.content}{END}")
    parts.append(ASSISTANT)
    return "".join(parts)


def context_of(prompt_text: str) -> str | None:
    """The retrieved-context turn of a rendered prompt, or None when it has none."""
    if CONTEXT not in prompt_text:
        return None
    return prompt_text.split(CONTEXT, 1)[1].split(END, 1)[0]


def render_example(prompt: str, response: str, context: str | None = None) -> tuple[str, str]:
    """(prompt_text, completion_text) for one single-turn exchange; loss goes on the completion only."""
    return render_prompt([Message("user", prompt)], context=context), f"{response}{END}{EOS}"
