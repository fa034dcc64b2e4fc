"""A constitution as data: principles with a check and a revision rule, loaded from `conf/constitution/*.yaml`.

Used three ways: critique (which principle a response breaks, and why), rule-based revision (the principle's
template), and an inference-time filter that revises a violating response before it is returned.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from neuraflux.world import lexicon
from neuraflux.world.judges import JUDGES

log = logging.getLogger(__name__)

CHECK_TYPES = ("regex", "lexicon", "judge")
LEXICONS = {
    "insults": lexicon.INSULTS,
    "compliance": lexicon.COMPLIANCE_MARKERS,
    "refusal": lexicon.REFUSAL_MARKERS,
}
TEMPLATE_FIELDS = ("refusal", "dont_know", "clean", "from_context")


@dataclass(frozen=True)
class Check:
    type: str
    pattern: str | None = None  # regex
    lexicon: str | None = None  # name in LEXICONS
    judge: str | None = None  # name in JUDGES
    threshold: float = 1.0  # judge: a score below this is a violation


@dataclass(frozen=True)
class Principle:
    id: str
    text: str
    check: Check
    revision: str  # template over TEMPLATE_FIELDS, e.g. "{refusal}"


@dataclass(frozen=True)
class Violation:
    principle: str
    reason: str


@dataclass
class FilterResult:
    response: str
    violations: list[Violation] = field(default_factory=list)

    @property
    def revised(self) -> bool:
        return bool(self.violations)


def _field(spec: dict, key: str, where: str, kind=str):
    if key not in spec or spec[key] in (None, ""):
        raise ValueError(f"constitution: {where} is missing the field '{key}'")
    value = spec[key]
    if not isinstance(value, kind):
        raise ValueError(f"constitution: {where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def parse_principle(spec: dict, index: int) -> Principle:
    """One principle from config, every field checked; errors name the principle and the field."""
    where = f"principle {index}"
    pid = _field(spec, "id", where)
    where = f"principle '{pid}'"
    text = _field(spec, "text", where)
    check_spec = _field(spec, "check", where, dict)
    ctype = _field(check_spec, "type", f"{where}.check")
    if ctype not in CHECK_TYPES:
        raise ValueError(f"constitution: {where}.check.type {ctype!r} is not one of {list(CHECK_TYPES)}")
    if ctype == "regex":
        pattern = _field(check_spec, "pattern", f"{where}.check")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"constitution: {where}.check.pattern {pattern!r} is not a valid regex: {err}") from None
        check = Check(ctype, pattern=pattern)
    elif ctype == "lexicon":
        name = _field(check_spec, "lexicon", f"{where}.check")
        if name not in LEXICONS:
            raise ValueError(f"constitution: {where}.check.lexicon {name!r} is not one of {sorted(LEXICONS)}")
        check = Check(ctype, lexicon=name)
    else:
        name = _field(check_spec, "judge", f"{where}.check")
        if name not in JUDGES:
            raise ValueError(f"constitution: {where}.check.judge {name!r} is not one of {list(JUDGES)}")
        threshold = float(check_spec.get("threshold", 1.0))
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"constitution: {where}.check.threshold must be in (0, 1], got {threshold}")
        check = Check(ctype, judge=name, threshold=threshold)
    revision = _field(spec, "revision", where)
    names = set(re.findall(r"{(\w*)}", revision))
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(
            f"constitution: {where}.revision uses unknown field(s) {unknown}; allowed: {list(TEMPLATE_FIELDS)}"
        )
    return Principle(pid, text, check, revision)


def strip_insults(response: str) -> str:
    """The response without its sentences that contain an insult."""
    sentences = re.split(r"(?<=[.!?])\s+", response.strip())
    return " ".join(s for s in sentences if not lexicon.contains_insult(s)).strip()


class Constitution:
    def __init__(self, principles: list[Principle]):
        if not principles:
            raise ValueError("constitution: no principles")
        ids = [p.id for p in principles]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"constitution: duplicate principle id(s) {dupes}")
        self.principles = principles

    @classmethod
    def from_config(cls, cfg) -> Constitution:
        """From a dict or DictConfig with a `principles` list."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # omegaconf is a core dependency; plain dicts work without it
            pass
        specs = cfg.get("principles") if isinstance(cfg, dict) else None
        if not isinstance(specs, list):
            raise ValueError("constitution: expected a 'principles' list")
        return cls([parse_principle(s if isinstance(s, dict) else {}, i) for i, s in enumerate(specs)])

    @classmethod
    def from_file(cls, path: str | Path) -> Constitution:
        """From a constitution YAML (`conf/constitution/*.yaml`); errors name the file, then principle and field."""
        import yaml
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"constitution: no such file {path}")
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except (OmegaConfBaseException, OSError, yaml.YAMLError) as err:
            # yaml's message gives line and column over several lines: keep them, on one
            raise ValueError(
                f"constitution: {path} is not a readable YAML mapping: {' '.join(str(err).split())}"
            ) from None
        try:
            return cls.from_config(cfg if isinstance(cfg, dict) else {})
        except ValueError as err:
            raise ValueError(f"constitution {path}: {str(err).removeprefix('constitution: ')}") from None

    @classmethod
    def load(cls, spec: str | Path) -> Constitution:
        """A constitution by name (`default`: `conf/constitution/default.yaml`) or by path (a `.yaml` file, or any
        spec with a directory in it); ValueError names the file, then the principle and field."""
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
            from neuraflux.paths import conf_file

            path = conf_file("constitution", f"{spec}.yaml")
        return cls.from_file(path)

    @property
    def needs_world(self) -> bool:
        return any(p.check.type == "judge" for p in self.principles)

    def _violates(self, p: Principle, prompt: str, response: str, world) -> str | None:
        c = p.check
        if c.type == "regex":
            m = re.search(c.pattern, response)
            return f"matches /{c.pattern}/: {m.group()!r}" if m else None
        if c.type == "lexicon":
            hit = next((w for w in LEXICONS[c.lexicon] if lexicon.contains_phrase(response, w)), None)
            return f"uses {hit!r} from the {c.lexicon} lexicon" if hit else None
        if world is None:
            raise ValueError(f"constitution: principle '{p.id}' checks with the {c.judge} judge and needs the world")
        from neuraflux.world import judges

        score = getattr(judges, c.judge)(prompt, response, world)
        return f"{c.judge} judge scores {score:.2f} < {c.threshold:.2f}" if score < c.threshold else None

    def violations(self, prompt: str, response: str, world=None) -> list[Violation]:
        found = []
        for p in self.principles:
            reason = self._violates(p, prompt, response, world)
            if reason is not None:
                found.append(Violation(p.id, reason))
        return found

    def critique(self, prompt: str, response: str, world=None) -> str:
        """A written critique naming each broken principle and why; empty when none is broken."""
        return self.describe(self.violations(prompt, response, world))

    def describe(self, violations: list[Violation]) -> str:
        """The critique of already-found violations (checks can be costly: judges parse the prompt)."""
        by_id = {p.id: p for p in self.principles}
        return " ".join(
            f"The response breaks '{v.principle}' ({by_id[v.principle].text}): it {v.reason}." for v in violations
        )

    def template_revision(self, principle_id: str, prompt: str, response: str, world=None) -> str:
        p = next(p for p in self.principles if p.id == principle_id)
        entity = None
        if world is not None:
            entity = world.parse_prompt(prompt).entity
        name = entity if isinstance(entity, str) else getattr(entity, "name", None) or "that"
        dont_know = lexicon.DONT_KNOW.format(name=name)
        from_context = dont_know
        if "{from_context}" in p.revision and world is not None:
            from neuraflux.world.judges import context_answer

            from_context = context_answer(prompt, world) or dont_know
        return p.revision.format(
            refusal=lexicon.REFUSAL, dont_know=dont_know, clean=strip_insults(response), from_context=from_context
        ).strip()

    def revise(self, prompt: str, response: str, world=None) -> FilterResult:
        """Apply the first broken principle's template until none is broken (at most one pass per principle);
        an empty revision becomes the refusal. `violations` lists what every pass found."""
        all_found: list[Violation] = []
        for _ in range(len(self.principles)):
            found = self.violations(prompt, response, world)
            if not found:
                break
            all_found += found
            response = self.template_revision(found[0].principle, prompt, response, world) or lexicon.REFUSAL
        return FilterResult(response, all_found)

    def filter(self, prompt: str, response: str, world=None) -> FilterResult:
        """`revise` at inference time, logging each response it revised."""
        result = self.revise(prompt, response, world)
        if result.revised:
            broken = sorted({v.principle for v in result.violations})
            log.info("constitution filter: revised a response breaking %s", broken)
        return result

    def violation_rates(self, prompts: list[str], responses: list[str], world=None) -> dict[str, float]:
        """Share of responses breaking each principle, and `any`."""
        n = max(1, len(responses))
        counts = {p.id: 0 for p in self.principles}
        any_count = 0
        for prompt, response in zip(prompts, responses):
            found = {v.principle for v in self.violations(prompt, response, world)}
            any_count += bool(found)
            for pid in found:
                counts[pid] += 1
        return {**{k: v / n for k, v in counts.items()}, "any": any_count / n}
