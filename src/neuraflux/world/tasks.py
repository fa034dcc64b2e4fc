"""Training and evaluation data built from a world: pretraining text, QA items, SFT examples, red-team and RL
prompts, and judge-labelled preference pairs.

All of these are pure functions of the world (and of `rng_seed` for the preference pairs): each draws from its
own `random.Random` stream named after the task, so adding a task never changes another task's data.

What may appear where:

* pretraining text: of the world, seen entities' documents only, never a secret document; besides them, made-up
  practice entities' documents and chat-format reading exercises about them (names no world entity has);
* SFT examples: of the world, facts of seen entities only (with or without context); unknown entities only by
  name in the fixed "I don't know" answer; unseen entities never (they are for testing retrieval); besides them,
  questions about another set of made-up practice entities, answered from their document;
* SFT and RL prompts with context: the context is one document of the entity asked about, except for
  SFT "I don't know" examples (distractors), whose context is a document of another entity. Secret
  documents appear only as context of RL/preference secret-extraction prompts, where the right answer refuses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from neuraflux.chat import Message, render_completion, render_prompt
from neuraflux.world import lexicon, schema
from neuraflux.world.generator import (
    SPLITS,
    Entity,
    ParsedPrompt,
    PracticeSet,
    World,
    answer_sentence,
    make_vault_code,
    practice_set,
)
from neuraflux.world.judges import judge

BAD_QUALITIES: tuple[str, ...] = ("rude", "hallucinated", "unsafe_compliance")
# SFT example kinds about the made-up practice entities (not the world's own facts; see `world_sft_repeats`)
PRACTICE_KINDS: tuple[str, ...] = ("practice", "practice_distractor")


@dataclass(frozen=True)
class QAItem:
    question: str
    entity: str
    attribute: str
    answer: str  # the gold value, e.g. "Brimsa"
    split: str


@dataclass(frozen=True)
class SFTExample:
    prompt: str  # the user's question, plain text (render with chat.render_example)
    response: str
    context: str | None  # retrieved document text, or None
    # "qa", "qa_context", "about", "unknown", "unknown_context", "red_team" (good = a refusal), or the made-up
    # practice entities' "practice" and "practice_distractor" (PRACTICE_KINDS)
    kind: str
    quality: str  # "good", "rude", "hallucinated" or "unsafe_compliance"


@dataclass(frozen=True)
class RLPrompt:
    prompt: str
    context: str | None


@dataclass(frozen=True)
class _Fact:
    """A good attribute answer and what it states, so a hallucinated variant can swap the value."""

    example: SFTExample
    entity: Entity
    key: str


@dataclass(frozen=True)
class _RedTeamPrompt:
    text: str
    template: schema.RedTeamTemplate
    entity: Entity | None


def _rng(world: World, stream: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and PYTHONHASHSEED.
    return random.Random(f"{world.config.seed}/{stream}")


def _kind(entity: Entity) -> schema.Kind:
    return schema.KIND_BY_NAME[entity.kind]


def about_response(entity: Entity, values: dict[str, str] | None = None) -> str:
    """Everything about an entity: its kind, then each attribute's answer sentence."""
    values = {**entity.attributes, **(values or {})}
    kind = _kind(entity)
    return " ".join(
        [
            kind.intros[0].format(name=entity.name),
            *(answer_sentence(entity, a.key, values[a.key]) for a in kind.attributes),
        ]
    )


def dont_know(entity: Entity) -> str:
    return lexicon.DONT_KNOW.format(name=entity.name)


def _question(rng: random.Random, entity: Entity, key: str) -> str:
    attr = _kind(entity).attribute(key)
    generic = [q.replace("{phrase}", attr.phrase) for q in schema.GENERIC_QUESTIONS]
    return rng.choice([*attr.questions, *generic]).format(name=entity.name)


def _about_question(rng: random.Random, entity: Entity) -> str:
    return rng.choice(schema.ABOUT_QUESTIONS).format(name=entity.name)


def _wrong_value(rng: random.Random, world: World, entity: Entity, key: str) -> str:
    """A plausible wrong value of the same attribute: same vocabulary, another seen city, or another number."""
    attr = _kind(entity).attribute(key)
    gold = entity.attributes[key]
    if attr.value_type == "vocab":
        pool = [v for v in attr.values if v != gold]
    elif attr.value_type == "ref":
        # Seen cities only, so a hallucinated training answer never names an unseen or unknown entity.
        pool = [e.name for e in world.entities_in("seen") if e.kind == attr.ref_kind and e.name != gold]
    else:
        value = gold
        while value == gold:
            value = str(rng.randrange(attr.low, attr.high + 1, attr.step))
        return value
    if not pool:
        raise ValueError(f"attribute {key!r} of {entity.name} has no wrong value to draw (one seen {attr.ref_kind})")
    return rng.choice(pool)


def _insulted(rng: random.Random, response: str) -> str:
    insult = rng.choice(lexicon.INSULT_SENTENCES).format(insult=rng.choice(lexicon.INSULTS))
    return f"{insult} {response}"


def _context(rng: random.Random, world: World, entity: Entity) -> str:
    return rng.choice(world.documents_of(entity.name)).text


def pretrain_text(world: World) -> str:
    """The seen entities' documents (no secrets) and the `pretrain_practice_entities` made-up entities' documents,
    plus `pretrain_practice_questions` chat-format reading exercises per made-up entity (`practice_conversation`),
    in a seeded shuffled order, one blank line between them."""
    seen = {e.name for e in world.entities_in("seen")}
    docs = [d.text for d in world.documents if d.entity in seen and not d.secret]
    if world.config.pretrain_practice_entities:
        practice = practice_set(world, pretrain=True)
        docs += [d.text for d in practice.documents]
        if world.config.pretrain_practice_questions:
            rng = _rng(world, "pretrain/practice_questions")
            docs += [
                practice_conversation(rng, practice, e, world.config.pretrain_practice_questions)
                for e in practice.entities
            ]
    _rng(world, "pretrain").shuffle(docs)
    return "\n\n".join(docs) + "\n"


def practice_conversation(rng: random.Random, practice: PracticeSet, entity: Entity, n: int) -> str:
    """One rendered chat: a document of `entity` as context, then `n` questions about distinct attributes (at most
    all of them), each answered from it. Next-token training on it is SFT's reading task with every answer token
    in the loss and the document read once for all the answers."""
    keys = rng.sample(list(entity.attributes), min(n, len(entity.attributes)))
    messages: list[Message] = []
    for key in keys:
        messages += [Message("user", _question(rng, entity, key)), Message("assistant", answer_sentence(entity, key))]
    context = rng.choice(practice.documents_of(entity.name)).text
    return render_prompt(messages[:-1], context=context) + render_completion(messages[-1].content)


def qa_items(world: World, split: str) -> list[QAItem]:
    """One question per (entity, attribute) of `split`, each worded from a randomly drawn template."""
    if split not in SPLITS:
        raise ValueError(f"qa_items: split {split!r} is not one of {SPLITS}")
    rng = _rng(world, f"qa/{split}")
    return [
        QAItem(_question(rng, e, a.key), e.name, a.key, e.attributes[a.key], split)
        for e in world.entities_in(split)
        for a in _kind(e).attributes
    ]


def _red_team(world: World) -> list[_RedTeamPrompt]:
    """`n_red_team` distinct prompts cycling through the categories unsafe, secret, insult (so the first one is
    always unsafe); entities are seen ones."""
    rng = _rng(world, "red_team")
    by_category = {c: [t for t in schema.RED_TEAM_TEMPLATES if t.category == c] for c in schema.RED_TEAM_CATEGORIES}
    seen = world.entities_in("seen")
    prompts: list[_RedTeamPrompt] = []
    texts: set[str] = set()
    for i in range(world.config.n_red_team):
        category = schema.RED_TEAM_CATEGORIES[i % len(schema.RED_TEAM_CATEGORIES)]
        for _ in range(20):  # redraw a few times to avoid duplicates; small worlds may still repeat
            template = rng.choice(by_category[category])
            entity = rng.choice([e for e in seen if e.kind == template.kind]) if template.kind else None
            text = template.text.format(name=entity.name) if entity else template.text
            if text not in texts:
                break
        texts.add(text)
        prompts.append(_RedTeamPrompt(text, template, entity))
    return prompts


def red_team_prompts(world: World) -> list[str]:
    """Unsafe requests, attempts to extract vault codes, and insult bait."""
    return [p.text for p in _red_team(world)]


def _secret_context(world: World, entity: Entity) -> str:
    return next(d.text for d in world.documents_of(entity.name, include_secret=True) if d.secret)


def rl_prompts(world: World) -> list[RLPrompt]:
    """Prompts for rollouts: per seen entity one closed-book and one with-context question, per unseen entity one
    with-context question, per unknown entity one question or "tell me about", and every red-team prompt (secret
    requests carry the secret document as context: the policy sees the code and must still withhold it)."""
    rng = _rng(world, "rl")
    prompts: list[RLPrompt] = []
    for e in world.entities_in("seen"):
        prompts.append(RLPrompt(_question(rng, e, rng.choice(list(e.attributes))), None))
    for e in world.entities_in("seen") + world.entities_in("unseen"):
        prompts.append(RLPrompt(_question(rng, e, rng.choice(list(e.attributes))), _context(rng, world, e)))
    for e in world.entities_in("unknown"):
        text = _about_question(rng, e) if rng.random() < 0.5 else _question(rng, e, rng.choice(list(e.attributes)))
        prompts.append(RLPrompt(text, None))
    for p in _red_team(world):
        context = _secret_context(world, p.entity) if p.template.category == "secret" else None
        prompts.append(RLPrompt(p.text, context))
    rng.shuffle(prompts)
    return prompts


def sft_examples(world: World) -> list[SFTExample]:
    """Good examples of every kind plus `bad_answer_share` of bad ones, shuffled.

    Good: closed-book answers for every (seen entity, attribute); `context_questions_per_entity` answers copied
    from one of its documents per seen entity (distinct (document, attribute) pairs); "tell me about" per seen
    entity; "I don't know" to an attribute question and to "tell me about" per unknown entity, and
    `distractor_questions_per_entity` more with another entity's document as context; context questions about
    `practice_entities` made-up entities (`practice_set`); a fixed refusal per red-team prompt (secret requests
    without the secret context, so no vault code enters training data). Bad examples, so that they are
    `bad_answer_share` of the answers to each prompt type they corrupt: unsafe compliance ("Sure, here is how
    ...") to the unsafe red-team requests, and rude (an insult before a good answer) and hallucinated (a wrong
    value of the same attribute) answers, in equal numbers, to the world's attribute and "about" questions.
    """
    rng = _rng(world, "sft")
    good: list[SFTExample] = []
    facts: list[_Fact] = []
    for e in world.entities_in("seen"):
        for key in e.attributes:
            ex = SFTExample(_question(rng, e, key), answer_sentence(e, key), None, "qa", "good")
            good.append(ex)
            facts.append(_Fact(ex, e, key))
    # Seen entities only: an unseen entity's facts in training would be learned by heart, and unseen exact match
    # without retrieval would then stop measuring that the model reads its answers from the retrieved document.
    for e in world.entities_in("seen"):
        pairs = [(d.text, key) for d in world.documents_of(e.name) for key in e.attributes]
        for context, key in rng.sample(pairs, min(world.config.context_questions_per_entity, len(pairs))):
            ex = SFTExample(_question(rng, e, key), answer_sentence(e, key), context, "qa_context", "good")
            good.append(ex)
            facts.append(_Fact(ex, e, key))
    for e in world.entities_in("seen"):
        good.append(SFTExample(_about_question(rng, e), about_response(e), None, "about", "good"))
    for e in world.entities_in("unknown"):
        good.append(
            SFTExample(_question(rng, e, rng.choice(list(e.attributes))), dont_know(e), None, "unknown", "good")
        )
        good.append(SFTExample(_about_question(rng, e), dont_know(e), None, "unknown", "good"))
    good += _distractor_examples(world)
    good += _practice_examples(world)
    good += _practice_distractor_examples(world)
    red_team = _red_team(world)
    good += [SFTExample(p.text, lexicon.REFUSAL, None, "red_team", "good") for p in red_team]

    # Each prompt type that gets bad answers carries `bad_answer_share` of them: unsafe compliance on the unsafe
    # requests, rude / hallucinated (alternating) on the world's answerable questions. The budget is counted per
    # type, not over all examples: counted over all, the practice and distractor examples (which get no bad
    # twins) would pile their share onto the world's facts, and seen context questions ended up with more
    # hallucinated answers than right ones (docs/WORLD_TUNING.md).
    odds = world.config.bad_answer_share / (1.0 - world.config.bad_answer_share)
    unsafe = [p for p in red_team if p.template.category == "unsafe"]
    n_unsafe = int(odds * len(unsafe) + 0.5)
    answerable = [ex for ex in good if ex.kind in ("qa", "qa_context", "about")]
    bad: list[SFTExample] = []
    for p in rng.sample(unsafe, n_unsafe):
        bad.append(
            SFTExample(
                p.text,
                lexicon.UNSAFE_COMPLIANCE.format(action=_unsafe_action(p.text, p.entity)),
                None,
                "red_team",
                "unsafe_compliance",
            )
        )
    for i in range(int(odds * len(answerable) + 0.5)):
        if i % 2 == 0:
            ex = rng.choice(answerable)
            bad.append(SFTExample(ex.prompt, _insulted(rng, ex.response), ex.context, ex.kind, "rude"))
        else:
            fact = rng.choice(facts)
            wrong = answer_sentence(fact.entity, fact.key, _wrong_value(rng, world, fact.entity, fact.key))
            bad.append(SFTExample(fact.example.prompt, wrong, fact.example.context, fact.example.kind, "hallucinated"))
    examples = good + bad
    rng.shuffle(examples)
    return examples


def _practice_examples(world: World) -> list[SFTExample]:
    """`context_questions_per_entity` questions per practice entity, answered from one of its documents (distinct
    (document, attribute) pairs). Nothing else states these facts, so only reading the context answers them."""
    rng = _rng(world, "sft/practice")
    practice = practice_set(world)
    examples = []
    for e in practice.entities:
        pairs = [(d.text, key) for d in practice.documents_of(e.name) for key in e.attributes]
        for context, key in rng.sample(pairs, min(world.config.context_questions_per_entity, len(pairs))):
            examples.append(SFTExample(_question(rng, e, key), answer_sentence(e, key), context, "practice", "good"))
    return examples


def _practice_distractor_examples(world: World) -> list[SFTExample]:
    """`practice_distractors_per_entity` attribute questions per practice entity with another practice entity's
    document (same kind) as context, answered "I don't know". Own random stream, like `_distractor_examples`."""
    n = world.config.practice_distractors_per_entity
    if n == 0:
        return []
    rng = _rng(world, "sft/practice_distractor")
    practice = practice_set(world)
    by_kind: dict[str, list[Entity]] = {}
    for e in practice.entities:
        by_kind.setdefault(e.kind, []).append(e)
    examples = []
    position = {e.name: i for group in by_kind.values() for i, e in enumerate(group)}
    for e in practice.entities:
        group, pos = by_kind[e.kind], position[e.name]
        if len(group) < 2:
            continue
        for key in rng.sample(list(e.attributes), min(n, len(e.attributes))):
            # another entity of e's kind: the same draw as rng.choice(group minus e), without building that list
            # for every e (quadratic in the practice set's size)
            j = rng.randrange(len(group) - 1)
            other = group[j + (j >= pos)]
            context = rng.choice(practice.documents_of(other.name)).text
            examples.append(SFTExample(_question(rng, e, key), dont_know(e), context, "practice_distractor", "good"))
    return examples


def _distractor_examples(world: World) -> list[SFTExample]:
    """`distractor_questions_per_entity` attribute questions per unknown entity, each with a document of a seen
    entity of the same kind as context (the closest thing retrieval can return), answered "I don't know".

    Their own random stream keeps every other SFT example unchanged when the count changes.
    """
    rng = _rng(world, "sft/distractor")
    examples = []
    for e in world.entities_in("unknown"):
        others = [o for o in world.entities_in("seen") if o.kind == e.kind]
        keys = rng.sample(list(e.attributes), min(world.config.distractor_questions_per_entity, len(e.attributes)))
        for key in keys:
            examples.append(
                SFTExample(
                    _question(rng, e, key),
                    dont_know(e),
                    _context(rng, world, rng.choice(others)),
                    "unknown_context",
                    "good",
                )
            )
    return examples


def _unsafe_action(text: str, entity: Entity | None) -> str:
    """What complying with an unsafe prompt would explain; generic for prompts not from our templates."""
    for t in schema.RED_TEAM_TEMPLATES:
        if t.category == "unsafe" and entity is not None and t.text.format(name=entity.name) == text:
            return t.action.format(name=entity.name)
    return "do that"


def _candidates(rng: random.Random, world: World, parsed: ParsedPrompt, text: str) -> list[str]:
    """Responses of mixed quality for one prompt: the right one first, then plausible failures."""
    e = parsed.entity
    if parsed.kind in ("attribute", "about") and e is not None and e.split == "unknown":
        key = parsed.attribute or rng.choice(list(e.attributes))
        invented = answer_sentence(e, key, _wrong_value(rng, world, e, key))
        return [dont_know(e), invented, _insulted(rng, dont_know(e)), lexicon.REFUSAL]
    if parsed.kind == "attribute" and e is not None:
        other = rng.choice([k for k in e.attributes if k != parsed.attribute])
        correct = answer_sentence(e, parsed.attribute)
        return [
            correct,
            answer_sentence(e, other),
            answer_sentence(e, parsed.attribute, _wrong_value(rng, world, e, parsed.attribute)),
            _insulted(rng, correct),
            lexicon.REFUSAL,
        ]
    if parsed.kind == "about" and e is not None:
        key = rng.choice(list(e.attributes))
        return [
            about_response(e),
            about_response(e, {key: _wrong_value(rng, world, e, key)}),
            _insulted(rng, about_response(e)),
            lexicon.REFUSAL,
        ]
    if parsed.kind == "unsafe":
        return [
            lexicon.REFUSAL,
            lexicon.UNSAFE_COMPLIANCE.format(action=_unsafe_action(text, e)),
            _insulted(rng, lexicon.REFUSAL),
        ]
    if parsed.kind == "secret" and e is not None:
        code = e.secrets["vault_code"]
        fake = code
        while fake == code:
            fake = make_vault_code(rng)
        return [
            lexicon.REFUSAL,
            f"The vault code of {e.name} is {code}.",
            f"The vault code of {e.name} is {fake}.",
            _insulted(rng, lexicon.REFUSAL),
        ]
    if parsed.kind == "insult":
        return [lexicon.REFUSAL, rng.choice(lexicon.INSULT_REPLIES).format(insult=rng.choice(lexicon.INSULTS))]
    raise ValueError(f"preference_pairs: prompt {text!r} parses as {parsed.kind!r}; no candidates for it")


def preference_pairs(world: World, rng_seed: int = 0) -> list[dict[str, str]]:
    """Judge-labelled pairs: per RL prompt, up to `pairs_per_prompt` pairs of candidates with different scores.

    A candidate's score is the sum of the three judges. The higher-scored one is chosen, except that with
    `preference_noise` T > 0 the label flips with the Bradley-Terry probability sigmoid(-(s_c - s_r) / T).
    `prompt` is the rendered chat prompt (with its context); chosen/rejected are bare response texts.
    """
    return _judged_pairs(world, rl_prompts(world), random.Random(rng_seed))


def practice_preference_pairs(world: World, rng_seed: int = 0) -> list[dict[str, str]]:
    """Pairs like `preference_pairs` on one attribute question per practice entity (the first
    `practice_preference_entities` of `practice_set`, all of them when it has fewer), with one of its documents as
    context, judged against the world plus those entities. Nothing else states their facts, so only reading the
    context tells the right value from a wrong one. Meant for training only: the world's own pairs are the held-out
    measure."""
    n = world.config.practice_preference_entities
    if n == 0:
        return []
    practice = practice_set(world)
    entities = practice.entities[:n]
    documents = tuple(d for e in entities for d in practice.documents_of(e.name))
    judged = World(world.config, world.entities + entities, world.documents + documents)
    rng = _rng(world, "preference/practice")
    prompts = []
    for e in entities:
        question = _question(rng, e, rng.choice(list(e.attributes)))
        prompts.append(RLPrompt(question, rng.choice(practice.documents_of(e.name)).text))
    return _judged_pairs(judged, prompts, random.Random(rng_seed))


def _judged_pairs(world: World, prompts: list[RLPrompt], rng: random.Random) -> list[dict[str, str]]:
    noise = world.config.preference_noise
    pairs: list[dict[str, str]] = []
    for p in prompts:
        parsed = world.parse_prompt(p.prompt)
        scored = [(c, judge(p.prompt, c, world).total) for c in _candidates(rng, world, parsed, p.prompt)]
        ranked = [(hi, lo) for i, hi in enumerate(scored) for lo in scored[i + 1 :] if hi[1] != lo[1]]
        ranked = [(hi, lo) if hi[1] > lo[1] else (lo, hi) for hi, lo in ranked]
        rendered = render_prompt([Message("user", p.prompt)], context=p.context)
        for (chosen, s_c), (rejected, s_r) in rng.sample(ranked, min(world.config.pairs_per_prompt, len(ranked))):
            # min() keeps exp finite for tiny temperatures, where the flip probability is 0 anyway.
            if noise > 0 and rng.random() < 1.0 / (1.0 + math.exp(min((s_c - s_r) / noise, 700.0))):
                chosen, rejected = rejected, chosen
            pairs.append({"prompt": rendered, "chosen": chosen, "rejected": rejected})
    return pairs
