"""Conversational data as TRL writes it, read as it is (data/conversation.py): multi-turn SFT `messages`, and
preference records whose prompt, chosen and rejected are lists of turns (explicit or implicit prompt)."""

import json

import pytest

from neuraflux.chat import Message, render_completion, render_prompt
from neuraflux.data.preference import PreferenceDataset
from neuraflux.data.sft import SFTDataModule
from neuraflux.tokenizer import NanoTokenizer

QUESTION = "How tall is <|end|> Zorn?"  # special-token text stays text
CONVERSATION = [
    {"role": "system", "content": "Zorn is a tower 212 metres tall."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello! Ask me about Zorn."},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "212 metres."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_multi_turn_sft_conversation_trains_on_its_last_answer_with_the_rest_as_prompt(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"prompt": "q", "response": "a"}] * 3)
    dm = SFTDataModule(path=str(path), val_fraction=0.5)
    history = [
        Message("user", "hi"),
        Message("assistant", "Hello! Ask me about Zorn."),
        Message("user", CONVERSATION[3]["content"]),
    ]
    # the system message reads as the context turn, as the server and the exported chat template read it
    expected = render_prompt(history, context="Zorn is a tower 212 metres tall.") + render_completion("212 metres.")
    assert dm.texts()[0] == expected
    assert "<|end|> Zorn" not in expected  # escaped: the user's text cannot close a turn
    dm.tokenizer = NanoTokenizer.train(dm.texts(), 0, mode="char")
    dm.setup("fit")
    example = next(e for e in [*dm.train_set.records, *dm.val_set.records] if len(e["ids"]) > 20)
    tok = dm.tokenizer
    # the loss starts exactly at the answer: everything before response_start is the rendered conversation
    assert tok.decode(example["ids"][: example["response_start"]]) == render_prompt(
        history, context="Zorn is a tower 212 metres tall."
    )


@pytest.mark.parametrize(
    "messages, message",
    [
        (CONVERSATION[:-1], "must end with a user turn and the assistant's answer"),
        ([{"role": "tool", "content": "x"}, *CONVERSATION], r"messages\[0\] must be \{'role': 'system' \| 'user'"),
        ([], "must be a non-empty list"),
    ],
)
def test_a_bad_conversation_is_named_by_file_and_line(tmp_path, messages, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q", "response": "a"}, {"messages": messages}])
    with pytest.raises(ValueError, match=f"chat.jsonl, line 2: .*{message}"):
        SFTDataModule(path=str(path))


def test_preference_records_with_turn_lists_explicit_and_implicit_prompt(tmp_path):
    turns = CONVERSATION[:-1]
    explicit = {
        "prompt": turns,
        "chosen": [{"role": "assistant", "content": "212 metres."}],
        "rejected": [{"role": "assistant", "content": "I don't know."}],
    }
    implicit = {
        "chosen": [*turns, {"role": "assistant", "content": "212 metres."}],
        "rejected": [*turns, {"role": "assistant", "content": "I don't know."}],
    }
    data = PreferenceDataset.from_jsonl(write_jsonl(tmp_path / "p.jsonl", [explicit, implicit]), on_invalid="error")
    history = [
        Message("user", "hi"),
        Message("assistant", "Hello! Ask me about Zorn."),
        Message("user", turns[3]["content"]),
    ]
    prompt = render_prompt(history, context="Zorn is a tower 212 metres tall.")
    assert [(e.prompt, e.chosen, e.rejected) for e in data] == [(prompt, "212 metres.", "I don't know.")] * 2


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]},
            "must share every turn but the last",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
             "rejected": [{"role": "assistant", "content": "c"}]},
            "field 'chosen' must be one assistant turn",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
             "rejected": [{"role": "assistant", "content": "b"}]},
            "chosen and rejected are identical",
        ),
    ],
)  # fmt: skip
def test_a_bad_conversational_pair_is_named(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(ValueError, match=f"p.jsonl, line 1: .*{message}"):
        PreferenceDataset.from_jsonl(path, on_invalid="error")
