"""Conversational records as people already have them (TRL's formats), read as they are.

- SFT: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`, multi-turn; the last turn
  is the assistant's answer that is trained on, everything before it is the prompt.
- Preference: `{"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}`, or, with the prompt
  implicit, `{"chosen": [whole conversation], "rejected": [whole conversation]}` sharing every turn but the last.

Our chat format has no system role: a system message is read as the context turn, as the server and the exported
chat template read it. Every content is escaped when rendered (chat.render_prompt), so no text in a data file
becomes a special token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from neuraflux.chat import Message, render_prompt

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Exchange:
    """A conversation cut before its last answer: the turns before it, the system text (as context) and the answer."""

    history: list[Message]  # ends with the user's turn being answered
    context: str | None
    response: str

    def prompt(self) -> str:
        return render_prompt(self.history, context=self.context)


def turns_of(value: object, field: str) -> tuple[list[Message], str | None]:
    """A list of {role, content} dicts as (messages, system text or None); ValueError names the field and turn."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages, system = [], []
    for i, turn in enumerate(value):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str) or not content.strip():
            raise ValueError(
                f"{field}[{i}] must be {{'role': 'system' | 'user' | 'assistant', 'content': non-empty string}}, "
                f"got {json.dumps(turn)[:80]}"
            )
        if role == "system":
            system.append(content.strip())
        else:
            messages.append(Message(role, content.strip()))
    return messages, "\n\n".join(system) or None


def split_last_answer(messages: list[Message], context: str | None, field: str) -> Exchange:
    """The conversation's last turn as the answer, the rest as its prompt; ValueError unless the last turn is the
    assistant's and the one before it the user's."""
    if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
        raise ValueError(f"field {field!r} must end with a user turn and the assistant's answer to it")
    return Exchange(messages[:-1], context, messages[-1].content)


def sft_exchange(record: dict) -> Exchange:
    """An SFT record's `messages` as an Exchange."""
    messages, context = turns_of(record["messages"], "messages")
    if record.get("context") is not None:
        raise ValueError("give the context as a system message or as 'context', not both")
    return split_last_answer(messages, context, "messages")


def single_answer(value: object, field: str) -> str:
    """A chosen/rejected field given as one assistant turn (a list of one {role: assistant, content})."""
    messages, system = turns_of(value, field)
    if system is not None or len(messages) != 1 or messages[0].role != "assistant":
        raise ValueError(f"field {field!r} must be one assistant turn when 'prompt' is a list of turns")
    return messages[0].content


def preference_conversation(record: dict) -> tuple[str, str, str]:
    """(rendered prompt, chosen, rejected) of a conversational preference record (see the module docstring)."""
    if record.get("prompt") is not None:
        messages, context = turns_of(record["prompt"], "prompt")
        if messages[-1].role != "user":
            raise ValueError("field 'prompt' must end with the user's turn")
        prompt = render_prompt(messages, context=context)
        return prompt, single_answer(record.get("chosen"), "chosen"), single_answer(record.get("rejected"), "rejected")
    chosen, context = turns_of(record.get("chosen"), "chosen")
    rejected, rejected_context = turns_of(record.get("rejected"), "rejected")
    a, b = split_last_answer(chosen, context, "chosen"), split_last_answer(rejected, rejected_context, "rejected")
    if a.history != b.history or a.context != b.context:
        raise ValueError("'chosen' and 'rejected' must share every turn but the last (the implicit prompt)")
    return a.prompt(), a.response, b.response


def is_conversational(record: dict) -> bool:
    """A record whose prompt, chosen or rejected is a list of turns."""
    return any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected"))
