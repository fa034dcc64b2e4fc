"""How well a trained model reads its context: the figures behind docs/WORLD_TUNING.md's tables.

For each model directory:

  fresh reading   one question about each documented entity of another world (`--fresh-seed`, never trained on),
                  answered with retrieval over that world's documents (k = 1, as `neuraflux.eval`): exact match of
                  the value, and the share of answers that repeat the asked name. Hundreds of entities, so less
                  noisy than the evaluation's 100 questions about ~25 unseen entities.
  unseen errors   every question about the model's own world's unseen entities, with retrieval: exact match per
                  value type (vocabulary, number, city name) and what the wrong answers did.

    python bench/world_reading.py outputs/world/<time>/sft/model outputs/world/<other time>/sft/model --threads 1
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.eval import world_config_for  # noqa: E402
from neuraflux.model.io import load_for_inference  # noqa: E402
from neuraflux.rag import NanoRAG, world_retriever  # noqa: E402
from neuraflux.world import WorldConfig, exact_match, generate_world, qa_items, schema  # noqa: E402


def answers(rag: NanoRAG, questions: list[str], batch: int = 64) -> list:
    out = []
    for i in range(0, len(questions), batch):
        out += rag.answer_batch(questions[i : i + batch], use_retrieval=True, max_new_tokens=48)
    return out


def fresh_reading(model, tok, seed: int, n_entities: int) -> tuple[float, float, int]:
    world = generate_world(WorldConfig(seed=seed, n_entities=n_entities, bad_answer_share=0.0))
    rng = random.Random(0)
    by_entity: dict[str, list] = {}
    for item in qa_items(world, "seen") + qa_items(world, "unseen"):
        by_entity.setdefault(item.entity, []).append(item)
    items = [rng.choice(group) for group in by_entity.values()]
    got = answers(NanoRAG(model, tok, world_retriever(world), k=1), [it.question for it in items])
    em = sum(exact_match(a.text, it.answer) for a, it in zip(got, items)) / len(items)
    named = sum(it.entity in a.text for a, it in zip(got, items)) / len(items)
    return em, named, len(items)


def unseen_errors(model, tok, model_dir: Path) -> tuple[dict[str, tuple[int, int]], Counter]:
    world = generate_world(world_config_for(model_dir if model_dir.is_dir() else model_dir.parent))
    items = qa_items(world, "unseen")
    got = answers(NanoRAG(model, tok, world_retriever(world), k=1), [it.question for it in items])
    entities = {e.name: e for e in world.entities}
    by_type: dict[str, list[int]] = {}
    outcomes: Counter = Counter()
    for it, a in zip(items, got):
        entity = entities[it.entity]
        value_type = schema.KIND_BY_NAME[entity.kind].attribute(it.attribute).value_type
        right = exact_match(a.text, it.answer)
        counts = by_type.setdefault(value_type, [0, 0])
        counts[0] += right
        counts[1] += 1
        outcomes[_outcome(a, it, entity, world, right)] += 1
    return {k: (v[0], v[1]) for k, v in by_type.items()}, outcomes


def _outcome(answer, item, entity, world, right: bool) -> str:
    text = answer.text
    if right:
        return "right"
    if "know" in text.lower():
        return "says it does not know"
    if item.entity not in text:
        return "garbles the asked name"
    if any(v in text for k, v in entity.attributes.items() if k != item.attribute):
        return "states another attribute of the entity"
    if not any(item.entity in h.text for h in answer.sources):
        return "was given another entity's document"
    stated = re.search(r" (?:is|was|in|are) ([^.]*)\.?$", text.strip())
    value = stated.group(1) if stated else text
    if value in {e.attributes.get(item.attribute) for e in world.entities}:
        return "a value of the attribute the document does not state"
    return "an invented or garbled value"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="model directories (RUN/sft/model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh-seed", type=int, default=4242, help="seed of the world the fresh questions come from")
    p.add_argument("--fresh-entities", type=int, default=600, help="its size (seen + unseen ones are asked about)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.models:
        model, tok = load_for_inference(str(path))
        model.eval()
        with torch.no_grad():
            em, named, n = fresh_reading(model, tok, args.fresh_seed, args.fresh_entities)
            by_type, outcomes = unseen_errors(model, tok, path)
        print(f"{path}: fresh reading {em:.3f}, asked name repeated {named:.3f} ({n} questions)")
        print(
            "  unseen, with retrieval, right by value type: "
            + ", ".join(f"{t} {r}/{n}" for t, (r, n) in sorted(by_type.items()))
        )
        print("  unseen answers: " + ", ".join(f"{c} {k}" for k, c in outcomes.most_common()))


if __name__ == "__main__":
    main()
