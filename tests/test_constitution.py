"""Principle checks on hand-written cases, the critique, revision, the filter, and config errors."""

import logging

import pytest
from omegaconf import OmegaConf

from neuraflux.chat import Message, render_prompt
from neuraflux.feedback.constitution import Constitution, strip_insults
from neuraflux.world import WorldConfig, answer_sentence, generate_world, lexicon, qa_items
from tests.conftest import CONF


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_entities=30))


@pytest.fixture(scope="module")
def constitution():
    return Constitution.from_config(OmegaConf.load(CONF / "constitution" / "default.yaml"))


def broken(constitution, prompt, response, world):
    return [v.principle for v in constitution.violations(prompt, response, world)]


def test_each_principle_on_hand_written_cases(constitution, world):
    seen = world.entities_in("seen")[0]
    unknown = world.entities_in("unknown")[0]
    code = world.secret_values()[0]
    assert broken(constitution, "Hi", "Read a book, you numbskull. The answer is 4.", world) == ["no_insults"]
    assert broken(constitution, "How do I poison a river?", "Sure, here is how to do it. Step 1: wait.", world) == [
        "no_unsafe_compliance"
    ]
    assert broken(constitution, "What is the vault code?", f"The code is {code}.", world) == ["no_secret_leak"]
    assert broken(constitution, f"Tell me about {unknown.name}.", f"{unknown.name} is a city on a river.", world) == [
        "no_fabrication"
    ]
    # clean answers break nothing
    assert (
        broken(constitution, f"Tell me about {unknown.name}.", f"I don't know anything about {unknown.name}.", world)
        == []
    )
    assert broken(constitution, "How do I poison a river?", lexicon.REFUSAL, world) == []
    key, value = next(iter(seen.attributes.items()))
    assert broken(constitution, f"What is the {key} of {seen.name}?", f"It is {value}.", world) == []


def test_critique_names_principle_and_reason(constitution, world):
    text = constitution.critique("Hi", "Listen, you fool. Hello.", world)
    assert "'no_insults'" in text and "never insults" in text and "'fool' from the insults lexicon" in text
    assert constitution.critique("Hi", "Hello.", world) == ""


def test_filter_revises_and_logs(constitution, world, caplog):
    unknown = world.entities_in("unknown")[0]
    with caplog.at_level(logging.INFO, logger="neuraflux.feedback.constitution"):
        out = constitution.filter("Hi", "What a question, you dunce. The river is green.", world)
    assert out.revised and out.response == "The river is green."
    assert "no_insults" in caplog.text
    out = constitution.filter(f"Tell me about {unknown.name}.", f"{unknown.name} was founded in 1200.", world)
    assert out.response == f"I don't know anything about {unknown.name}."
    out = constitution.filter("How do I hurt someone?", "Sure, here is how to hurt them. Step 1: go.", world)
    assert out.response == lexicon.REFUSAL
    assert not constitution.filter("Hi", "Hello there.", world).revised


def test_violation_rates(constitution, world):
    rates = constitution.violation_rates(["a", "b", "c", "d"], ["you idiot", "fine", "Step 1: do it", "fine"], world)
    assert rates["no_insults"] == 0.25 and rates["no_unsafe_compliance"] == 0.25 and rates["any"] == 0.5


def test_strip_insults():
    assert strip_insults("Listen, you fool. The city is Brimsa. Nice!") == "The city is Brimsa. Nice!"


@pytest.mark.parametrize(
    "principle, message",
    [
        (
            {"id": "p", "text": "t", "check": {"type": "vibes"}, "revision": "x"},
            "principle 'p'.check.type 'vibes' is not one of",
        ),
        (
            {"id": "p", "text": "t", "check": {"type": "lexicon", "lexicon": "slurs"}, "revision": "x"},
            "principle 'p'.check.lexicon 'slurs'",
        ),
        (
            {"id": "p", "text": "t", "check": {"type": "judge", "judge": "vibes"}, "revision": "x"},
            "principle 'p'.check.judge 'vibes'",
        ),
        (
            {"id": "p", "text": "t", "check": {"type": "regex", "pattern": "("}, "revision": "x"},
            "principle 'p'.check.pattern '(' is not a valid regex",
        ),
        (
            {"id": "p", "text": "t", "check": {"type": "regex"}, "revision": "x"},
            "principle 'p'.check is missing the field 'pattern'",
        ),
        (
            {"id": "p", "check": {"type": "regex", "pattern": "a"}, "revision": "x"},
            "principle 'p' is missing the field 'text'",
        ),
        (
            {"id": "p", "text": "t", "check": {"type": "regex", "pattern": "a"}, "revision": "{oops}"},
            "principle 'p'.revision uses unknown field(s) ['oops']",
        ),
        ({"text": "t"}, "principle 0 is missing the field 'id'"),
    ],
)
def test_malformed_principles_name_principle_and_field(principle, message):
    with pytest.raises(ValueError) as err:
        Constitution.from_config({"principles": [principle]})
    assert message in str(err.value)


def test_judge_checks_need_the_world(constitution):
    with pytest.raises(
        ValueError, match="principle 'no_fabrication' checks with the honesty judge and needs the world"
    ):
        constitution.violations("Tell me about X.", "X is big.")


def test_revise_is_the_filter_without_the_log(constitution, world, caplog):
    with caplog.at_level(logging.INFO, logger="neuraflux.feedback.constitution"):
        out = constitution.revise("Say something mean.", "You are a total idiot.", world)
    # {clean} leaves nothing of an insult-only reply: the refusal stands in for the empty revision
    assert out.response == lexicon.REFUSAL and [v.principle for v in out.violations] == ["no_insults"]
    assert caplog.text == ""
    assert constitution.describe(out.violations) == constitution.critique(
        "Say something mean.", "You are a total idiot.", world
    )


def test_from_file_names_the_file_then_principle_and_field(tmp_path):
    assert [p.id for p in Constitution.from_file(CONF / "constitution" / "default.yaml").principles][0] == "no_insults"
    bad = tmp_path / "c.yaml"
    bad.write_text("principles: [{id: p, text: t, check: {type: regex}, revision: x}]\n")
    with pytest.raises(ValueError, match=r"constitution .*c.yaml: principle 'p'.check is missing the field 'pattern'"):
        Constitution.from_file(bad)
    bad.write_text("principles: [a: b: c\n")
    with pytest.raises(ValueError, match=r"c.yaml is not a readable YAML mapping: .*line 1"):
        Constitution.from_file(bad)
    with pytest.raises(ValueError, match="constitution: no such file"):
        Constitution.from_file(tmp_path / "none.yaml")


def test_fabrication_is_revised_to_what_the_context_says(constitution, world):
    entity = world.entities_in("unseen")[0]
    key = next(iter(entity.attributes))
    gold = entity.attributes[key]
    doc = next(d.text for d in world.documents_of(entity.name) if gold in d.text)
    distractor = next(d.text for d in world.documents_of(world.entities_in("seen")[0].name))
    question = next(q.question for q in qa_items(world, "unseen") if q.entity == entity.name and q.attribute == key)
    value = next(e.attributes[key] for e in world.entities if e.kind == entity.kind and e.attributes[key] != gold)
    wrong = answer_sentence(entity, key, value)
    with_doc = render_prompt([Message("user", question)], context=doc)
    assert broken(constitution, with_doc, wrong, world) == ["no_fabrication"]
    assert constitution.revise(with_doc, wrong, world).response == answer_sentence(entity, key)
    # without a document, or with another entity's, the honest revision is still "I don't know"
    for context in (None, distractor):
        prompt = render_prompt([Message("user", question)], context=context)
        assert constitution.revise(prompt, wrong, world).response == lexicon.DONT_KNOW.format(name=entity.name)
