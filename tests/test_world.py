"""The generated world and the task data built from it: determinism, the seen/unseen/unknown wall, sizes."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from neuraflux.chat import ASSISTANT, BOS, CONTEXT, USER, Message, render_prompt
from neuraflux.world import (
    World,
    WorldConfig,
    answer_sentence,
    exact_match,
    generate_world,
    judge,
    practice_preference_pairs,
    preference_pairs,
    pretrain_text,
    qa_items,
    red_team_prompts,
    rl_prompts,
    schema,
    sft_examples,
)
from neuraflux.world.generator import _reserved_words, practice_set, split_counts
from neuraflux.world.lexicon import DONT_KNOW, REFUSAL, contains_insult, normalize_text


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(WorldConfig())


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text, flags=re.IGNORECASE) is not None


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seen_share": 0.5}, "must sum to 1"),
        ({"unknown_share": -0.1, "seen_share": 0.9}, "unknown_share must be in"),
        ({"bad_answer_share": 1.0}, "bad_answer_share must be in"),
        ({"n_entities": 0}, "n_entities must be >= 1"),
        ({"n_entities": 11}, "leaves a kind with fewer than 2 seen entities"),  # 2 per kind: round(1.2) = 1
        ({"n_red_team": 0}, "n_red_team must be >= 1 when bad_answer_share > 0"),
        ({"preference_noise": -1.0}, "preference_noise must be >= 0"),
        ({"docs_per_entity": 0}, "docs_per_entity must be >= 1"),
        ({"distractor_questions_per_entity": -1}, "distractor_questions_per_entity must be >= 0"),
        ({"practice_distractors_per_entity": -2}, "practice_distractors_per_entity must be >= 0"),
        ({"world_sft_repeats": 0}, "world_sft_repeats must be >= 1"),
        ({"practice_preference_entities": -1}, "practice_preference_entities must be >= 0"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**overrides)


def test_from_dict_names_an_unknown_key_and_where_it_came_from():
    assert WorldConfig.from_dict({"seed": 3, "n_entities": 40}) == WorldConfig(seed=3, n_entities=40)
    assert WorldConfig.from_dict(None) == WorldConfig()
    with pytest.raises(ValueError, match=r"run/config.yaml: world: unknown world key\(s\) \['answer_style'\]"):
        WorldConfig.from_dict({"seed": 3, "answer_style": "value"}, "run/config.yaml: world")


def test_split_counts_round_cumulatively():
    cfg = WorldConfig()
    # 38 of a kind: seen = round(22.8) = 23, seen+unseen = round(30.4) = 30 -> unseen 7, unknown 8.
    assert split_counts(38, cfg) == {"seen": 23, "unseen": 7, "unknown": 8}
    # 37: round(22.2) = 22, round(29.6) = 30 -> 22 / 8 / 7.
    assert split_counts(37, cfg) == {"seen": 22, "unseen": 8, "unknown": 7}


# --- world -----------------------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs():
    a, b = generate_world(WorldConfig(seed=3)), generate_world(WorldConfig(seed=3))
    assert a.to_json() == b.to_json()
    assert pretrain_text(a) == pretrain_text(b)
    assert sft_examples(a) == sft_examples(b)
    assert preference_pairs(a, 1) == preference_pairs(b, 1)
    c = generate_world(WorldConfig(seed=4))
    assert c.to_json() != a.to_json()
    assert {e.name for e in c.entities} != {e.name for e in a.entities}


def test_generation_ignores_global_random_state(world):
    import random

    random.seed(12345)
    assert generate_world(WorldConfig()).to_json() == world.to_json()


def test_save_load_round_trip(world, tmp_path):
    path = tmp_path / "world.json"
    world.save(path)
    loaded = World.load(path)
    assert loaded == world
    assert loaded.to_json() == world.to_json()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        World.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid world JSON"):
        World.load(bad)
    bad.write_text('{"config": {}, "entities": [{"name": "X"}], "documents": []}')
    with pytest.raises(ValueError, match=r"entities\[0\]: missing fields \['kind', 'split', 'attributes'\]"):
        World.load(bad)
    bad.write_text('{"config": {"seed": 1, "n_entitys": 5}, "entities": [], "documents": []}')
    with pytest.raises(ValueError, match=r"bad.json: config: missing fields \[\], unexpected fields \['n_entitys'\]"):
        World.load(bad)


def test_entities_split_by_kind_with_unique_made_up_names(world):
    assert len(world.entities) == 150
    names = [e.name.lower() for e in world.entities]
    assert len(set(names)) == 150
    assert not set(names) & _reserved_words()
    assert all(any(c in n for c in ("zh", "vr", "kr", "ae")) and 4 <= len(n) <= 10 for n in names)
    counts = Counter((e.kind, e.split) for e in world.entities)
    # Round-robin kinds: person and city get 38 entities, company and creature 37.
    assert counts["person", "seen"] == 23 and counts["person", "unseen"] == 7 and counts["person", "unknown"] == 8
    assert counts["company", "seen"] == 22 and counts["company", "unseen"] == 8 and counts["company", "unknown"] == 7


def test_attribute_values_are_typed_and_references_point_at_seen_cities(world):
    seen_cities = {e.name for e in world.entities_in("seen") if e.kind == "city"}
    for e in world.entities:
        kind = schema.KIND_BY_NAME[e.kind]
        assert list(e.attributes) == [a.key for a in kind.attributes]
        for a in kind.attributes:
            value = e.attributes[a.key]
            if a.value_type == "vocab":
                assert value in a.values
            elif a.value_type == "ref":
                assert value in seen_cities
            else:
                assert a.low <= int(value) <= a.high and int(value) % a.step == 0
        assert bool(e.secrets) == (e.kind == "company")


def test_attribute_domains_within_a_kind_are_disjoint():
    # The judges rely on it: a right value of one attribute must never read as a wrong value of another.
    for kind in schema.KINDS:
        vocab = [set(a.values) for a in kind.attributes if a.value_type == "vocab"]
        assert sum(len(v) for v in vocab) == len(set().union(*vocab)), kind.name
        ranges = sorted((a.low, a.high) for a in kind.attributes if a.value_type == "number")
        assert all(hi < lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:], strict=False)), kind.name
        assert sum(a.value_type == "ref" for a in kind.attributes) <= 1


def test_documents_have_stable_ids_and_state_every_attribute(world):
    for e in world.entities:
        docs = world.documents_of(e.name, include_secret=True)
        if e.split == "unknown":
            assert docs == []
            continue
        expected = [f"doc-{e.name.lower()}-{n}" for n in range(3 + bool(e.secrets))]
        assert [d.doc_id for d in docs] == expected
        for d in docs:
            if d.secret:
                assert exact_match(d.text, e.secrets["vault_code"])
            else:
                assert all(exact_match(d.text, v) for v in e.attributes.values())
        texts = [d.text for d in docs if not d.secret]
        assert len(set(texts)) == len(texts)  # several wordings, not copies
    assert world.retrieval_documents() == list(world.documents)


# --- task data -------------------------------------------------------------------------------------------------


def test_pretrain_text_holds_seen_documents_only(world):
    text = pretrain_text(world)
    assert len(text.encode()) < 300_000
    for e in world.entities_in("seen"):
        for d in world.documents_of(e.name):
            assert d.text in text
    for e in world.entities_in("unseen") + world.entities_in("unknown"):
        assert not _mentions(text, e.name), e.name
    for code in world.secret_values():
        assert code not in text
    assert text.count("\n\n") == len(world.entities_in("seen")) * 3 - 1


def test_qa_items_ask_every_attribute_and_parse_back(world):
    items = qa_items(world, "unseen")
    unseen = world.entities_in("unseen")
    assert len(items) == sum(len(e.attributes) for e in unseen)
    templates = Counter()
    for item in items:
        e = world.entity(item.entity)
        assert item.answer == e.attributes[item.attribute] and item.split == "unseen"
        parsed = world.parse_prompt(item.question)
        assert (parsed.kind, parsed.entity.name, parsed.attribute) == ("attribute", item.entity, item.attribute)
        templates[item.question.replace(item.entity, "X")] += 1
    assert len(templates) > 20  # several question templates are in use
    with pytest.raises(ValueError, match="split 'train' is not one of"):
        qa_items(world, "train")


def test_parse_prompt_reads_only_the_user_turn(world):
    person = next(e for e in world.entities_in("seen") if e.kind == "person")
    other = next(e for e in world.entities_in("seen") if e.kind == "company")
    question = f"When was {person.name} born?"
    rendered = render_prompt([Message("user", question)], context=f"Facts about {other.name}.")
    assert world.parse_prompt(rendered) == world.parse_prompt(question)
    assert world.parse_prompt(rendered).attribute == "birth_year"
    # Phrasings outside the templates fall back to keyword cues.
    assert world.parse_prompt(f"pls, {person.name.upper()} birth year??").attribute == "birth_year"
    assert world.parse_prompt("What is the weather like?").kind == "other"


def test_sft_examples_mix_and_leak_nothing(world):
    examples = sft_examples(world)
    kinds = Counter((ex.kind, ex.quality) for ex in examples)
    n_seen, n_unseen, n_unknown = (len(world.entities_in(s)) for s in ("seen", "unseen", "unknown"))
    seen_attrs = sum(len(e.attributes) for e in world.entities_in("seen"))
    assert kinds["qa", "good"] == seen_attrs
    # Context questions are about seen entities only: unseen ones stay out of SFT, for testing retrieval.
    assert kinds["qa_context", "good"] == 2 * n_seen
    assert kinds["about", "good"] == n_seen
    assert kinds["unknown", "good"] == 2 * n_unknown
    assert kinds["red_team", "good"] == world.config.n_red_team
    # bad answers are 0.3 of the answers to the prompt types they corrupt: the world's attribute / about questions
    answerable = ("qa", "qa_context", "about")
    n_good = sum(v for (k, q), v in kinds.items() if q == "good" and k in answerable)
    n_bad = sum(v for (k, q), v in kinds.items() if q in ("rude", "hallucinated"))
    assert {k for (k, q) in kinds if q in ("rude", "hallucinated")} <= set(answerable)
    assert n_bad == round(0.3 / 0.7 * n_good)
    assert abs(n_bad / (n_bad + n_good) - 0.3) < 0.002
    # 12 unsafe prompts among 36 red-team ones: round(12 * 0.3 / 0.7) = 5 compliances.
    assert kinds["red_team", "unsafe_compliance"] == 5
    rude = sum(v for (_, q), v in kinds.items() if q == "rude")
    halluc = sum(v for (_, q), v in kinds.items() if q == "hallucinated")
    assert abs(rude - halluc) <= 1

    hidden = [e.name for e in world.entities_in("unseen")]
    codes = world.secret_values()
    for ex in examples:
        assert not any(code in ex.response or code in ex.prompt or code in (ex.context or "") for code in codes)
        assert not any(_mentions(ex.response, n) or _mentions(ex.context or "", n) for n in hidden), ex
        if ex.kind == "qa_context" and ex.quality == "good":
            parsed = world.parse_prompt(ex.prompt)
            value = parsed.entity.attributes[parsed.attribute]
            assert exact_match(ex.context, value) and exact_match(ex.response, value)
        if ex.kind == "unknown":
            assert ex.response == DONT_KNOW.format(name=world.parse_prompt(ex.prompt).entity.name)
        if ex.kind == "red_team" and ex.quality == "good":
            assert ex.response == REFUSAL
        if ex.quality == "rude":
            assert contains_insult(ex.response)
        if ex.quality == "hallucinated":
            parsed = world.parse_prompt(ex.prompt)
            assert not exact_match(ex.response, parsed.entity.attributes[parsed.attribute])
        if ex.quality == "unsafe_compliance":
            assert ex.response.startswith("Sure, here is how to ")


def test_distractor_examples_answer_dont_know_from_another_entitys_document():
    world = generate_world(WorldConfig(n_entities=40, distractor_questions_per_entity=3, bad_answer_share=0.0))
    examples = [ex for ex in sft_examples(world) if ex.kind == "unknown_context"]
    unknown = world.entities_in("unknown")
    # every unknown entity has at least 3 attributes, so each gets exactly 3 distinct questions
    assert len(examples) == 3 * len(unknown) == len({ex.prompt for ex in examples})
    owner = {d.text: world.entity(d.entity) for d in world.documents}
    for ex in examples:
        asked = world.parse_prompt(ex.prompt)
        assert asked.kind == "attribute" and asked.entity.split == "unknown"
        assert ex.response == DONT_KNOW.format(name=asked.entity.name)
        # the distractor is a seen entity of the same kind, so it reads like the document retrieval would return
        assert owner[ex.context].split == "seen" and owner[ex.context].kind == asked.entity.kind
        assert not _mentions(ex.context, asked.entity.name)


def test_distractor_count_leaves_other_examples_unchanged():
    plain = sft_examples(generate_world(WorldConfig(n_entities=40, bad_answer_share=0.0)))
    more = sft_examples(
        generate_world(WorldConfig(n_entities=40, bad_answer_share=0.0, distractor_questions_per_entity=2))
    )
    assert sorted(map(repr, plain)) == sorted(repr(ex) for ex in more if ex.kind != "unknown_context")


def test_practice_distractors_ask_a_practice_name_beside_another_practice_entitys_document():
    cfg = dict(n_entities=40, practice_entities=20, bad_answer_share=0.0)
    world = generate_world(WorldConfig(**cfg, practice_distractors_per_entity=2))
    practice = practice_set(world)
    by_name = {e.name: e for e in practice.entities}
    owner = {d.text: by_name[d.entity] for d in practice.documents}
    examples = [ex for ex in sft_examples(world) if ex.kind == "practice_distractor"]
    assert all(ex.context in owner for ex in examples)
    assert len(examples) == 2 * len(practice.entities)
    for ex in examples:
        asked = next(e for e in practice.entities if ex.response == DONT_KNOW.format(name=e.name))
        assert _mentions(ex.prompt, asked.name) and not _mentions(ex.context, asked.name)
        assert owner[ex.context].kind == asked.kind and owner[ex.context].name != asked.name
    # the option adds these and changes nothing else
    plain = sft_examples(generate_world(WorldConfig(**cfg)))
    assert sorted(map(repr, plain)) == sorted(repr(ex) for ex in sft_examples(world) if ex not in examples)


def test_context_questions_draw_distinct_document_attribute_pairs():
    world = generate_world(WorldConfig(n_entities=40, context_questions_per_entity=100, bad_answer_share=0.0))
    examples = [ex for ex in sft_examples(world) if ex.kind == "qa_context"]
    seen = world.entities_in("seen")
    # capped at every (document, attribute) pair: 3 documents x each entity's attributes
    assert len(examples) == sum(3 * len(e.attributes) for e in seen)
    keys = {(ex.context, world.parse_prompt(ex.prompt).attribute) for ex in examples}
    assert len(keys) == len(examples)


def test_practice_entities_are_outside_the_world_and_answered_from_their_document():
    plain = generate_world(WorldConfig(n_entities=40))
    world = generate_world(
        WorldConfig(n_entities=40, practice_entities=10, context_questions_per_entity=3, bad_answer_share=0.0)
    )
    # the world itself (entities, documents, retrieval store) does not depend on the practice count
    assert world.entities == plain.entities and world.documents == plain.documents
    practice = practice_set(world)
    assert len(practice.entities) == 10 and {e.split for e in practice.entities} == {"practice"}
    assert [e.kind for e in practice.entities[:3]] == [k.name for k in schema.KINDS[:3]]  # kinds round-robin
    assert not {e.name.lower() for e in practice.entities} & {e.name.lower() for e in world.entities}
    assert len(practice.documents) == 10 * world.config.docs_per_entity
    examples = [ex for ex in sft_examples(world) if ex.kind == "practice"]
    assert len(examples) == 10 * 3
    by_name = {e.name: e for e in practice.entities}
    for ex in examples:
        entity = next(by_name[n] for n in by_name if _mentions(ex.prompt, n))
        assert ex.context in {d.text for d in practice.documents_of(entity.name)}
        # the answer sentence states a value of the entity that its document states too
        value = next(v for v in entity.attributes.values() if exact_match(ex.response, v))
        assert exact_match(ex.context, value)


def test_pretrain_practice_documents_join_the_pretraining_text_and_nothing_else():
    cfg = dict(n_entities=40, practice_entities=10, bad_answer_share=0.3)
    plain = generate_world(WorldConfig(**cfg))
    world = generate_world(WorldConfig(**cfg, pretrain_practice_entities=12))
    assert world.entities == plain.entities and world.documents == plain.documents
    extra = practice_set(world, pretrain=True)
    assert len(extra.entities) == 12 and len(extra.documents) == 12 * world.config.docs_per_entity
    names = {e.name.lower() for e in extra.entities}
    assert not names & {e.name.lower() for e in [*world.entities, *practice_set(world).entities]}
    blocks = pretrain_text(world).rstrip("\n").split("\n\n")
    plain_blocks = pretrain_text(plain).rstrip("\n").split("\n\n")
    assert sorted(blocks) == sorted([*plain_blocks, *(d.text for d in extra.documents)])
    # every other task is unchanged: the extra names are never asked about
    assert sft_examples(world) == sft_examples(plain)
    assert rl_prompts(world) == rl_prompts(plain) and preference_pairs(world) == preference_pairs(plain)
    assert qa_items(world, "unseen") == qa_items(plain, "unseen")


def test_pretrain_practice_questions_add_chat_reading_exercises_to_the_pretraining_text():
    from neuraflux.chat import END, EOS, USER

    cfg = dict(n_entities=40, pretrain_practice_entities=12)
    plain = generate_world(WorldConfig(**cfg))
    world = generate_world(WorldConfig(**cfg, pretrain_practice_questions=3))
    extra = practice_set(world, pretrain=True)
    blocks = pretrain_text(world).rstrip("\n").split("\n\n")
    chats = [b for b in blocks if b.startswith("<|bos|>")]
    assert sorted(b for b in blocks if b not in chats) == sorted(pretrain_text(plain).rstrip("\n").split("\n\n"))
    assert len(chats) == 12
    by_name = {e.name: e for e in extra.entities}
    for chat in chats:
        assert chat.endswith(f"{END}{EOS}") and chat.count(USER) == 3 and chat.count(ASSISTANT) == 3
        context = chat.split(CONTEXT, 1)[1].split(END, 1)[0]
        doc = next(d for d in extra.documents if d.text == context)  # one of the entity's own documents
        entity = by_name[doc.entity]
        turns = chat.split(USER)[1:]
        asked = set()
        for turn in turns:
            question, answer = turn.split(f"{END}{ASSISTANT}")
            assert entity.name in question
            # the answer is the true sentence of one attribute not asked before, and its value is in the context
            key = next(k for k in entity.attributes if answer.split(END)[0] == answer_sentence(entity, k))
            assert key not in asked and entity.attributes[key] in context
            asked.add(key)
    # nothing else changes: SFT and evaluation data are the same
    assert sft_examples(world) == sft_examples(plain) and qa_items(world, "unseen") == qa_items(plain, "unseen")


def test_smallest_world_builds_every_task():
    # 3 per kind: seen = round(1.8) = 2, seen+unseen = round(2.4) = 2, so no unseen entity and 1 unknown.
    world = generate_world(WorldConfig(n_entities=12))
    assert Counter(e.split for e in world.entities) == {"seen": 8, "unknown": 4}
    assert sft_examples(world) and preference_pairs(world) and rl_prompts(world)


def test_no_bad_answers_when_share_is_zero():
    examples = sft_examples(generate_world(WorldConfig(n_entities=40, bad_answer_share=0.0)))
    assert {ex.quality for ex in examples} == {"good"}


def test_red_team_prompts_cycle_categories_and_parse(world):
    prompts = red_team_prompts(world)
    assert len(prompts) == 36 and len(set(prompts)) == 36
    categories = [world.parse_prompt(p).kind for p in prompts]
    assert categories == ["unsafe", "secret", "insult"] * 12


def test_rl_prompts_mix(world):
    prompts = rl_prompts(world)
    n_seen, n_unseen, n_unknown = (len(world.entities_in(s)) for s in ("seen", "unseen", "unknown"))
    assert len(prompts) == 2 * n_seen + n_unseen + n_unknown + 36
    with_context = [p for p in prompts if p.context is not None]
    # one per seen and unseen entity, plus the 12 secret requests that carry the secret document
    assert len(with_context) == n_seen + n_unseen + 12
    for p in with_context:
        parsed = world.parse_prompt(p.prompt)
        if parsed.kind == "secret":
            assert exact_match(p.context, parsed.entity.secrets["vault_code"])
        else:
            assert exact_match(p.context, parsed.entity.attributes[parsed.attribute])


def test_preference_pairs_prefer_the_higher_judge_score(world):
    pairs = preference_pairs(world, rng_seed=0)
    assert 0 < len(pairs) <= 3 * len(rl_prompts(world))
    for pair in pairs:
        assert pair["prompt"].startswith(BOS) and pair["prompt"].endswith(ASSISTANT)
        chosen = judge(pair["prompt"], pair["chosen"], world).total
        rejected = judge(pair["prompt"], pair["rejected"], world).total
        assert chosen > rejected
    assert any(CONTEXT in p["prompt"] for p in pairs)
    assert preference_pairs(world, rng_seed=0) == pairs
    assert preference_pairs(world, rng_seed=1) != pairs


def test_practice_preference_pairs_ask_practice_entities_beside_their_own_document():
    cfg = WorldConfig(practice_entities=40, practice_preference_entities=25)
    world = generate_world(cfg)
    assert practice_preference_pairs(generate_world(WorldConfig(practice_entities=40))) == []
    # more than there are: the practice set's 10, not an error (stage=reward asks for 1000 whatever the world)
    assert (
        len(
            practice_preference_pairs(
                generate_world(WorldConfig(practice_entities=10, practice_preference_entities=25))
            )
        )
        == 30
    )
    pairs = practice_preference_pairs(world)
    practice = {e.name: e for e in practice_set(world).entities[:25]}
    asked = set()
    for pair in pairs:
        question = pair["prompt"].split(USER)[-1]
        name = next(n for n in practice if _mentions(question, n))
        asked.add(name)
        assert world.find_entity(name) is None  # not one of the world's entities
        context = pair["prompt"].split(CONTEXT)[1].split(USER)[0]
        assert any(d.text in context for d in practice_set(world).documents_of(name))
    assert asked == set(practice)
    assert not {p["prompt"] for p in pairs} & {p["prompt"] for p in preference_pairs(world)}
    # judged like the world's pairs, against the world plus these entities: chosen always scores higher, and
    # many rejected answers state a value that no attribute of the entity has (a wrong value)
    judged = World(
        cfg,
        world.entities + tuple(practice.values()),
        world.documents + tuple(d for n in practice for d in practice_set(world).documents_of(n)),
    )
    wrong = 0
    for pair in pairs:
        assert (
            judge(pair["prompt"], pair["chosen"], judged).total > judge(pair["prompt"], pair["rejected"], judged).total
        )
        e = practice[next(n for n in practice if _mentions(pair["prompt"].split(USER)[-1], n))]
        wrong += pair["rejected"] not in {answer_sentence(e, k) for k in e.attributes} | {REFUSAL}
    assert wrong > 20
    assert len(pairs) == 25 * 3
    assert practice_preference_pairs(world) == pairs  # seeded


def test_preference_noise_flips_at_the_bradley_terry_rate():
    world = generate_world(WorldConfig(n_entities=80, preference_noise=1.0))
    pairs = preference_pairs(world, rng_seed=0)
    margins = [
        judge(p["prompt"], p["chosen"], world).total - judge(p["prompt"], p["rejected"], world).total for p in pairs
    ]
    flipped = sum(m < 0 for m in margins)
    assert 0 not in margins
    # Each pair flips with probability sigmoid(-|margin| / T), T = 1: 0.269 for margin 1, 0.119 for margin 2.
    expected = sum(1 / (1 + math.exp(abs(m))) for m in margins)
    sd = math.sqrt(sum(q * (1 - q) for q in (1 / (1 + math.exp(abs(m))) for m in margins)))
    assert abs(flipped - expected) < 4 * sd


def test_exact_match_is_whole_word_and_normalised():
    assert exact_match("The home city of Vorlak is  BRIMSA!", "Brimsa")
    assert exact_match("born in 1820.", "1820")
    assert not exact_match("born in 18201", "1820")
    assert not exact_match("Brimsaton is nice", "Brimsa")
    assert exact_match("The vault code is k4p7 - r3q9", "K4P7-R3Q9")
    with pytest.raises(ValueError, match="empty after normalisation"):
        exact_match("anything", " ?! ")
    assert normalize_text("Don\u2019t  STOP!") == "don t stop"


def test_builtin_sft_records_repeat_the_worlds_examples_not_the_practice_ones():
    from neuraflux.data.builtin import builtin_sft_records

    cfg = dict(n_entities=40, practice_entities=10, practice_distractors_per_entity=1, world_sft_repeats=3)
    records = builtin_sft_records("world", cfg)
    kinds = [ex.kind for ex in sft_examples(generate_world(WorldConfig(**cfg)))]
    assert len(records) == len(kinds)  # one record per example: the data module repeats the training split
    assert [r["repeats"] for r in records] == [1 if k in ("practice", "practice_distractor") else 3 for k in kinds]
    assert kinds.count("practice") == 10 * 2 and kinds.count("practice_distractor") == 10  # 2 context questions each


def test_world_conf_lists_every_field_so_each_is_overridable():
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "world" / "default.yaml")
    assert set(conf) == {f.name for f in fields(WorldConfig)}  # Hydra refuses `world.X=` for a key it lacks
    WorldConfig.from_dict(OmegaConf.to_container(conf))
