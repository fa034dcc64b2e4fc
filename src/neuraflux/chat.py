"""The chat format shared by SFT, RAG, the alignment stages and the server.

A conversation renders as::

    <|bos|><|context|>retrieved text<|end|><|user|>question<|end|><|assistant|>answer<|end|><|eos|>

The context turn is optional. Special-token strings are the single source of truth for the tokenizer.

Only this module writes them: text from a user, a document or a data file never becomes a special token.
`escape_special` breaks every special-token string in such text with a zero-width space after its `<` (the text
reads the same, and tokenizes as ordinary characters), and every renderer here escapes what it is given, so the
structure of a rendered prompt is exactly what the renderer wrote. Raw text that is encoded without a renderer
(pretraining text, a raw completion prompt) goes through `escape_special` too.
"""

from __future__ import annotations

import re
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
ROLE_OF_TOKEN = {token: role for role, token in ROLE_TOKENS.items()}
UNK = "<|unk|>"  # the character tokenizer's unknown symbol: escaped like the others
ESCAPE = "\u200b"  # zero width space, inserted after the `<` of a special-token string found in text

_SPECIAL_IN_TEXT = re.compile("<(?=(" + "|".join(re.escape(t[1:]) for t in (*SPECIAL_TOKENS, UNK)) + "))")


def escape_special(text: str) -> str:
    """`text` with every special-token string broken (`<|user|>` -> `<` ZWSP `|user|>`), so that no tokenizer reads
    a special token in it. Idempotent; text without special-token strings comes back unchanged."""
    return _SPECIAL_IN_TEXT.sub("<" + ESCAPE, text)


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
    """Text up to and including the assistant tag, ready for generation; every content and the context escaped."""
    parts = [BOS]
    if context:
        parts.append(f"{CONTEXT}{escape_special(context)}{END}")
    for m in as_messages(messages):
        parts.append(f"{ROLE_TOKENS[m.role]}{escape_special(m.content)}{END}")
    parts.append(ASSISTANT)
    return "".join(parts)


def render_completion(response: str) -> str:
    """A response as the chat format ends it (escaped, then the end-of-turn and end-of-sequence tokens)."""
    return f"{escape_special(response)}{END}{EOS}"


_TURN = re.compile("(" + "|".join(re.escape(t) for t in (CONTEXT, USER, ASSISTANT)) + ")(.*?)" + re.escape(END), re.S)


def parse_prompt(text: str) -> tuple[list[Message], str | None]:
    """The (messages, context) that `render_prompt` rendered into `text`: its inverse on the renderer's own output,
    whose contents hold no special-token string. ValueError for text of any other shape."""
    if not (text.startswith(BOS) and text.endswith(ASSISTANT)):
        raise ValueError("not a rendered chat prompt: it must start with <|bos|> and end with <|assistant|>")
    body, pos = text[len(BOS) : -len(ASSISTANT)], 0
    messages: list[Message] = []
    context = None
    for m in _TURN.finditer(body):
        if m.start() != pos:
            raise ValueError(f"not a rendered chat prompt: unexpected text at character {len(BOS) + pos}")
        role = ROLE_OF_TOKEN[m.group(1)]
        if role == "context":
            if messages or context is not None:
                raise ValueError("not a rendered chat prompt: the context turn must come first, once")
            context = m.group(2)
        else:
            messages.append(Message(role, m.group(2)))
        pos = m.end()
    if pos != len(body):
        raise ValueError(f"not a rendered chat prompt: unexpected text at character {len(BOS) + pos}")
    return messages, context


def render_record(record: dict, where: str = "") -> str:
    """A data record's prompt, rendered: `{"prompt": str}` (one user turn) or `{"messages": [{"role", "content"},
    ...]}` (a conversation), with an optional `{"context": str}` (a retrieved document). ValueError names `where`
    and the field. A prompt that is already rendered (starts with `<|bos|>`) is refused: special tokens are never
    read from data, so the turns must come as `messages`."""
    at = f"{where}: " if where else ""
    context = record.get("context")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"{at}field 'context' must be a string, got {type(context).__name__}")
    if record.get("messages") is not None:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{at}field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        messages = []
        for i, turn in enumerate(turns):
            role = turn.get("role") if isinstance(turn, dict) else None
            content = turn.get("content") if isinstance(turn, dict) else None
            if role not in ("user", "assistant") or not isinstance(content, str) or not content.strip():
                raise ValueError(
                    f"{at}messages[{i}] must be {{'role': 'user' | 'assistant', 'content': non-empty string}}, "
                    f"got {str(turn)[:80]}"
                )
            messages.append(Message(role, content.strip()))
        if messages[-1].role != "user":
            raise ValueError(f"{at}the last of 'messages' must be the user's turn (the prompt to answer)")
        return render_prompt(messages, context=context or None)
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{at}field 'prompt' must be a non-empty string, got {str(prompt)[:80]!r}")
    if prompt.startswith(BOS):
        raise ValueError(
            f"{at}field 'prompt' is a rendered chat prompt; special tokens are never read from data: give the "
            "turns as 'messages': [{'role', 'content'}, ...] and a document as 'context'"
        )
    return render_prompt([Message("user", prompt.strip())], context=context or None)


def context_of(prompt_text: str) -> str | None:
    """The retrieved-context turn of a rendered prompt, or None when it has none."""
    if CONTEXT not in prompt_text:
        return None
    return prompt_text.split(CONTEXT, 1)[1].split(END, 1)[0]


def render_example(prompt: str, response: str, context: str | None = None) -> tuple[str, str]:
    """(prompt_text, completion_text) for one single-turn exchange; loss goes on the completion only."""
    return render_prompt([Message("user", prompt)], context=context), render_completion(response)
