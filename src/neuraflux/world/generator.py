"""The seeded world: fictional entities with typed attributes, the documents that describe them, and the
prompt parser the judges use to tell what a question asks.

Entities are split three ways:

* seen    -- their documents are the pretraining text and back the closed-book SFT questions;
* unseen  -- their documents live only in the retrieval store (answerable with retrieved context only);
* unknown -- no document anywhere; the right answer about them is "I don't know".

Every random draw comes from one `random.Random(cfg.seed)`, consumed in a fixed order, so one seed always gives
the byte-identical world.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from neuraflux.chat import END, USER
from neuraflux.world import lexicon, schema
from neuraflux.world.lexicon import normalize_text

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("seen", "unseen", "unknown")

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "vr",
    "z",
    "zh",
    "sk",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "k", "th", "m", "x")
# Every name holds one of these clusters, which English words lack, so no name is a real word ("Taken", "Never").
_FOREIGN_CLUSTERS = ("zh", "vr", "kr", "ae")
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_CODE_DIGITS = "23456789"
_MAX_ENTITIES = 20000


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the generated world and of the task data built from it.

    The default (150 entities, 3 documents each) gives about 60 KB of pretraining text.
    """

    seed: int = 0
    n_entities: int = 150
    seen_share: float = 0.6
    unseen_share: float = 0.2
    unknown_share: float = 0.2
    docs_per_entity: int = 3  # documents per entity, each a full fact sheet in different wording
    context_questions_per_entity: int = 2  # SFT questions answered from one of its documents, per seen entity
    # SFT "I don't know" answers per unknown entity whose context is another entity's document (what retrieval
    # returns for a name it has no document of), so an irrelevant retrieved document still yields "I don't know"
    distractor_questions_per_entity: int = 0
    # made-up entities outside the world whose documents are SFT reading practice only: their facts cannot be
    # learned closed-book, so answering about them teaches copying from the context (see `practice_set`)
    practice_entities: int = 0
    # SFT "I don't know" answers per practice entity whose context is another practice entity's document: the same
    # made-up names answered from their own document elsewhere, so only checking whose document it is decides
    practice_distractors_per_entity: int = 0
    # more made-up entities whose documents join the pretraining text only (none of them is asked about anywhere):
    # fresh names repeated through each document are what next-token training learns copying (induction) from
    pretrain_practice_entities: int = 0
    # per pretraining practice entity, a chat-format conversation in the pretraining text: one of its documents as
    # context and this many questions about it, each answered from it (reading practice at pretraining's density)
    pretrain_practice_questions: int = 0
    # times each of the world's own SFT examples (all but the practice ones) appears in the SFT training split, so
    # that a practice set large enough to be seen about once does not crowd out the world's facts
    world_sft_repeats: int = 1
    bad_answer_share: float = 0.3  # share of SFT examples that are bad: rude, hallucinated, unsafe compliance
    n_red_team: int = 36
    preference_noise: float = 0.0  # Bradley-Terry temperature for flipping preference labels; 0 = no flips
    pairs_per_prompt: int = 3
    # practice entities (at most practice_entities: the first ones) that also give preference pairs (one attribute
    # question each, one of its documents as context), for the training split only: telling a stated value from
    # the document's is the reading the world's held-out pairs need, and the world has a few hundred pairs to teach it
    practice_preference_entities: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, source: str = "world") -> WorldConfig:
        """A WorldConfig from a config section; a key that is not a field (a typo, or one a newer version removed)
        is named with `source` (the config key or file it came from) instead of a bare TypeError."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{source}: unknown world key(s) {unknown}; WorldConfig's fields are {[f.name for f in fields(cls)]}"
            )
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("n_entities", "docs_per_entity", "pairs_per_prompt", "world_sft_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "context_questions_per_entity",
            "distractor_questions_per_entity",
            "practice_entities",
            "practice_distractors_per_entity",
            "pretrain_practice_entities",
            "pretrain_practice_questions",
            "n_red_team",
            "practice_preference_entities",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_entities + self.practice_entities + self.pretrain_practice_entities > _MAX_ENTITIES:
            raise ValueError(
                f"WorldConfig.n_entities + practice_entities + pretrain_practice_entities must be <= "
                f"{_MAX_ENTITIES}, got {self.n_entities} + {self.practice_entities} + "
                f"{self.pretrain_practice_entities}"
            )
        for name in ("seen_share", "unseen_share", "unknown_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        total = self.seen_share + self.unseen_share + self.unknown_share
        if abs(total - 1.0) > 1e-9:
            raise ValueError(
                f"WorldConfig split shares seen_share + unseen_share + unknown_share must sum to 1, got {total}"
            )
        if not 0.0 <= self.bad_answer_share < 1.0:
            raise ValueError(f"WorldConfig.bad_answer_share must be in [0, 1), got {self.bad_answer_share}")
        if self.bad_answer_share > 0 and self.n_red_team < 1:
            raise ValueError(
                "WorldConfig.n_red_team must be >= 1 when bad_answer_share > 0: "
                "unsafe-compliance examples answer red-team prompts"
            )
        if self.preference_noise < 0:
            raise ValueError(f"WorldConfig.preference_noise must be >= 0, got {self.preference_noise}")
        smallest_kind = self.n_entities // len(schema.KINDS)
        if split_counts(smallest_kind, self)["seen"] < 2:
            # Two per kind: a hallucinated answer needs a second seen city to name, red-team prompts need entities.
            raise ValueError(
                f"WorldConfig.n_entities={self.n_entities} with seen_share={self.seen_share} leaves a "
                f"kind with fewer than 2 seen entities; each of the {len(schema.KINDS)} kinds needs 2"
            )


def split_counts(n: int, cfg: WorldConfig) -> dict[str, int]:
    """How many of `n` entities of one kind go to each split (cumulative rounding, so counts sum to n)."""
    seen_end = int(cfg.seen_share * n + 0.5)
    unseen_end = max(seen_end, min(n, int((cfg.seen_share + cfg.unseen_share) * n + 0.5)))
    return {"seen": seen_end, "unseen": unseen_end - seen_end, "unknown": n - unseen_end}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # a schema.KINDS name
    split: str  # "seen", "unseen" or "unknown" ("practice" for `practice_set` entities, which are in no split)
    attributes: dict[str, str]  # attribute key -> value, numbers as decimal strings
    secrets: dict[str, str] = field(default_factory=dict)  # e.g. {"vault_code": "K4P7-R3Q9"}


def answer_sentence(entity: Entity, key: str, value: str | None = None) -> str:
    """The canonical answer, e.g. "The home city of Vorlak is Brimsa."; `value` overrides the true one."""
    attr = schema.KIND_BY_NAME[entity.kind].attribute(key)
    return attr.answer.format(name=entity.name, value=entity.attributes[key] if value is None else value)


@dataclass(frozen=True)
class Document:
    doc_id: str  # "doc-<entity lower-case>-<n>"
    entity: str
    text: str
    secret: bool = False  # holds a secret: retrieval store only, never training text


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt asks. `kind` is "attribute", "about", "unsafe", "secret", "insult" or "other"."""

    kind: str
    entity: Entity | None = None
    attribute: str | None = None  # set for kind "attribute"


@dataclass
class World:
    """The generated ground truth: every entity (all splits) and every document (the retrieval store)."""

    config: WorldConfig
    entities: tuple[Entity, ...]
    documents: tuple[Document, ...]
    _by_name: dict[str, Entity] = field(init=False, repr=False, compare=False)
    _secret_parts: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {e.name.lower(): e for e in self.entities}
        self._secret_parts = frozenset(w for v in self.secret_values() for w in normalize_text(v).split())
        if len(self._by_name) != len(self.entities):
            raise ValueError("World.entities: entity names must be unique (case-insensitively)")

    def entity(self, name: str) -> Entity:
        try:
            return self._by_name[name.lower()]
        except KeyError:
            raise KeyError(f"no entity named {name!r} in this world") from None

    def find_entity(self, name: str) -> Entity | None:
        return self._by_name.get(name.lower())

    def entities_in(self, split: str) -> list[Entity]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return [e for e in self.entities if e.split == split]

    def documents_of(self, name: str, include_secret: bool = False) -> list[Document]:
        return [d for d in self.documents if d.entity == name and (include_secret or not d.secret)]

    def retrieval_documents(self) -> list[Document]:
        """The retrieval store: every document, secret ones included (unknown entities have none)."""
        return list(self.documents)

    def secret_values(self) -> list[str]:
        return [v for e in self.entities for v in e.secrets.values()]

    def secret_parts(self) -> frozenset[str]:
        """The normalised words of every secret ("K4P7-R3Q9" -> "k4p7", "r3q9"); any one of them is a leak."""
        return self._secret_parts

    def parse_prompt(self, prompt_text: str) -> ParsedPrompt:
        return parse_prompt(self, prompt_text)

    def to_json(self) -> str:
        """Deterministic JSON: equal worlds give equal strings."""
        return json.dumps(
            {
                "config": asdict(self.config),
                "entities": [asdict(e) for e in self.entities],
                "documents": [asdict(d) for d in self.documents],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> World:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid world JSON: {e}") from e
        for key in ("config", "entities", "documents"):
            if key not in raw:
                raise ValueError(f"{source}: world JSON has no {key!r} field")
        return cls(
            config=_build(WorldConfig, raw["config"], f"{source}: config"),
            entities=tuple(_build(Entity, item, f"{source}: entities[{i}]") for i, item in enumerate(raw["entities"])),
            documents=tuple(
                _build(Document, item, f"{source}: documents[{i}]") for i, item in enumerate(raw["documents"])
            ),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> World:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"world file {path} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))


def _build(cls: type, item: dict, where: str) -> object:
    names = {f.name for f in fields(cls)}
    missing = [
        f.name for f in fields(cls) if f.name not in item and f.default is MISSING and f.default_factory is MISSING
    ]
    unknown = sorted(set(item) - names)
    if missing or unknown:
        raise ValueError(f"{where}: missing fields {missing}, unexpected fields {unknown}")
    return cls(**item)


def _reserved_words() -> set[str]:
    """Every word the templates, vocabularies and lexicon use; a name must be none of them."""
    texts = [
        *lexicon.INSULTS,
        *lexicon.INSULT_SENTENCES,
        *lexicon.INSULT_REPLIES,
        lexicon.REFUSAL,
        lexicon.DONT_KNOW,
        lexicon.UNSAFE_COMPLIANCE,
        *schema.GENERIC_QUESTIONS,
        *schema.ABOUT_QUESTIONS,
        *schema.SECRET_SENTENCES,
        *(t.text for t in schema.RED_TEAM_TEMPLATES),
    ]
    for kind in schema.KINDS:
        texts += [kind.name, *kind.intros]
        for a in kind.attributes:
            texts += [a.phrase, a.answer, *a.sentences, *a.questions, *a.values]
    return {w for t in texts for w in normalize_text(t).split()}


def _make_name(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((2, 2, 3)))]
    return "".join(syllables).capitalize()


def make_vault_code(rng: random.Random) -> str:
    """A vault code like "K4P7-R3Q9": letters and digits mixed, so it never reads as a year or a count."""

    def part() -> str:
        return (
            rng.choice(_CODE_LETTERS) + rng.choice(_CODE_DIGITS) + rng.choice(_CODE_LETTERS) + rng.choice(_CODE_DIGITS)
        )

    return f"{part()}-{part()}"


def _draw_value(rng: random.Random, attr: schema.Attribute, refs: list[str]) -> str:
    if attr.value_type == "vocab":
        return rng.choice(attr.values)
    if attr.value_type == "ref":
        return rng.choice(refs)
    return str(rng.randrange(attr.low, attr.high + 1, attr.step))


def _render_documents(rng: random.Random, entity: Entity, n_docs: int) -> list[Document]:
    """`n_docs` documents, each stating every attribute; template choices rotate so wording differs per doc."""
    kind = schema.KIND_BY_NAME[entity.kind]
    intro_offset = rng.randrange(len(kind.intros))
    sentence_offsets = [rng.randrange(len(a.sentences)) for a in kind.attributes]
    docs = []
    for n in range(n_docs):
        order = list(range(len(kind.attributes)))
        rng.shuffle(order)
        sentences = [kind.intros[(intro_offset + n) % len(kind.intros)].format(name=entity.name)]
        for i in order:
            attr = kind.attributes[i]
            template = attr.sentences[(sentence_offsets[i] + n) % len(attr.sentences)]
            sentences.append(template.format(name=entity.name, value=entity.attributes[attr.key]))
        docs.append(Document(f"doc-{entity.name.lower()}-{n}", entity.name, " ".join(sentences)))
    if entity.secrets:
        text = " ".join(t.format(name=entity.name, value=entity.secrets["vault_code"]) for t in schema.SECRET_SENTENCES)
        docs.append(Document(f"doc-{entity.name.lower()}-{n_docs}", entity.name, text, secret=True))
    return docs


def _draw_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """`n` new names, none in `taken` (lower-case; updated in place) nor a template word."""
    reserved = _reserved_words()
    names: list[str] = []
    while len(names) < n:
        name = _make_name(rng)
        lower = name.lower()
        if (
            lower not in taken
            and lower not in reserved
            and 4 <= len(name) <= 10
            and any(c in lower for c in _FOREIGN_CLUSTERS)
        ):
            taken.add(lower)
            names.append(name)
    return names


def generate_world(cfg: WorldConfig) -> World:
    """The world for `cfg`; a pure function of it (same config, byte-identical `to_json`)."""
    rng = random.Random(cfg.seed)
    names = _draw_names(rng, cfg.n_entities, set())

    # Round-robin kinds, then a stratified split so every kind has seen, unseen and unknown members.
    kind_of = {name: schema.KINDS[i % len(schema.KINDS)].name for i, name in enumerate(names)}
    split_of: dict[str, str] = {}
    for kind in schema.KINDS:
        members = [n for n in names if kind_of[n] == kind.name]
        rng.shuffle(members)
        counts = split_counts(len(members), cfg)
        start = 0
        for split in SPLITS:
            for n in members[start : start + counts[split]]:
                split_of[n] = split
            start += counts[split]

    # References point at seen entities only, so seen documents never name an unseen or unknown entity.
    seen_of_kind = {k.name: [n for n in names if kind_of[n] == k.name and split_of[n] == "seen"] for k in schema.KINDS}
    codes: set[str] = set()
    entities = []
    for name in names:
        kind = schema.KIND_BY_NAME[kind_of[name]]
        attributes = {a.key: _draw_value(rng, a, seen_of_kind.get(a.ref_kind, [])) for a in kind.attributes}
        secrets = {}
        for key in kind.secret_keys:
            code = make_vault_code(rng)
            while code in codes:
                code = make_vault_code(rng)
            codes.add(code)
            secrets[key] = code
        entities.append(Entity(name, kind.name, split_of[name], attributes, secrets))

    documents = [d for e in entities if e.split != "unknown" for d in _render_documents(rng, e, cfg.docs_per_entity)]
    world = World(cfg, tuple(entities), tuple(documents))
    log.debug("generated world seed=%d: %d entities, %d documents", cfg.seed, len(entities), len(documents))
    return world


@dataclass(frozen=True)
class PracticeSet:
    """Made-up entities for SFT reading practice: in no split, the retrieval store or any evaluation."""

    entities: tuple[Entity, ...]
    documents: tuple[Document, ...]

    def documents_of(self, name: str) -> list[Document]:
        return list(self._by_entity.get(name, ()))

    @cached_property
    def _by_entity(self) -> dict[str, list[Document]]:
        # an index, not a scan: SFT data asks for every entity's documents, and practice sets run to thousands
        index: dict[str, list[Document]] = {}
        for d in self.documents:
            index.setdefault(d.entity, []).append(d)
        return index


def practice_set(world: World, pretrain: bool = False) -> PracticeSet:
    """`world.config.practice_entities` entities with names no world entity has, kinds round-robin, documents
    rendered like the world's; references name seen entities only. Drawn from their own seeded stream, so the
    world itself does not change with their number. `pretrain=True`: the `pretrain_practice_entities` set instead
    (its own stream; names distinct from the world's and the SFT practice set's)."""
    cfg = world.config
    taken = {e.name.lower() for e in world.entities}
    if pretrain:
        taken |= {e.name.lower() for e in practice_set(world).entities}
    rng = random.Random(f"{cfg.seed}/{'pretrain_practice' if pretrain else 'practice'}")
    names = _draw_names(rng, cfg.pretrain_practice_entities if pretrain else cfg.practice_entities, taken)
    seen_of_kind = {k.name: [e.name for e in world.entities_in("seen") if e.kind == k.name] for k in schema.KINDS}
    entities, documents = [], []
    for i, name in enumerate(names):
        kind = schema.KINDS[i % len(schema.KINDS)]
        attributes = {a.key: _draw_value(rng, a, seen_of_kind.get(a.ref_kind, [])) for a in kind.attributes}
        entity = Entity(name, kind.name, "practice", attributes)
        entities.append(entity)
        documents += _render_documents(rng, entity, cfg.docs_per_entity)
    return PracticeSet(tuple(entities), tuple(documents))


# ---------------------------------------------------------------------------------------------------------------
# Prompt parsing: invert the question templates.

_PLACEHOLDER = "qqentityqq"


@dataclass(frozen=True)
class _TemplateMatch:
    kind: str  # ParsedPrompt.kind
    entity_kind: str  # the entity kind the template is for; "" = any kind or no entity
    attribute: str | None = None


def _template_key(template: str) -> str:
    return normalize_text(template.replace(schema.NAME_SLOT, _PLACEHOLDER))


def _build_template_index() -> dict[str, list[_TemplateMatch]]:
    index: dict[str, list[_TemplateMatch]] = {}
    for kind in schema.KINDS:
        for attr in kind.attributes:
            generic = [q.replace("{phrase}", attr.phrase) for q in schema.GENERIC_QUESTIONS]
            for q in (*attr.questions, *generic):
                index.setdefault(_template_key(q), []).append(_TemplateMatch("attribute", kind.name, attr.key))
    for q in schema.ABOUT_QUESTIONS:
        index.setdefault(_template_key(q), []).append(_TemplateMatch("about", ""))
    for t in schema.RED_TEAM_TEMPLATES:
        index.setdefault(_template_key(t.text), []).append(_TemplateMatch(t.category, t.kind))
    return index


_TEMPLATE_INDEX = _build_template_index()


def question_text(prompt_text: str) -> str:
    """The last user turn of a rendered chat prompt, or the text itself when it has no chat tags."""
    if USER not in prompt_text:
        return prompt_text
    turn = prompt_text.rsplit(USER, 1)[1]
    return turn.split(END, 1)[0]


def _fallback(entity: Entity, norm: str) -> ParsedPrompt:
    """Prompts not written from our templates: look for a secret, an attribute phrase, then an 'about' cue."""
    kind = schema.KIND_BY_NAME[entity.kind]
    padded = f" {norm} "
    if entity.secrets and f" {schema.SECRET_PHRASE} " in padded:
        return ParsedPrompt("secret", entity)
    for attr in sorted(kind.attributes, key=lambda a: -len(a.phrase)):
        if f" {normalize_text(attr.phrase)} " in padded:
            return ParsedPrompt("attribute", entity, attr.key)
    if any(f" {cue} " in padded for cue in ("about", "describe", "who is", "what is")):
        return ParsedPrompt("about", entity)
    return ParsedPrompt("other", entity)


def parse_prompt(world: World, prompt_text: str) -> ParsedPrompt:
    """Find the entity and what is asked about it, from a raw question or a rendered chat prompt.

    Only the last user turn is read (a retrieved context names entities too). Questions written from the
    schema templates parse exactly; other phrasings fall back to keyword cues.
    """
    norm = normalize_text(question_text(prompt_text))
    for match in _TEMPLATE_INDEX.get(norm, []):
        if not match.entity_kind:
            return ParsedPrompt(match.kind)
    words = norm.split()
    mentioned = [e for w in dict.fromkeys(words) if (e := world.find_entity(w)) is not None]
    for entity in mentioned:
        key = " ".join(_PLACEHOLDER if w == entity.name.lower() else w for w in words)
        for match in _TEMPLATE_INDEX.get(key, []):
            if match.entity_kind in ("", entity.kind):
                return ParsedPrompt(match.kind, entity, match.attribute)
    if mentioned:
        return _fallback(mentioned[0], norm)
    return ParsedPrompt("other")
