"""Evaluate a trained model on the built-in world: exact match per entity split, the judges, retrieval recall.

python -m neuraflux.eval --model outputs/world/<run>/sft [--limit 100] [--out eval.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuraflux.model.quantize import MODES as QUANT_MODES
from neuraflux.rag import NanoRAG, world_retriever
from neuraflux.retrieval.documents import RetrievalSettings
from neuraflux.world import (
    SPLITS,
    QAItem,
    World,
    WorldConfig,
    exact_match,
    generate_world,
    judge,
    qa_items,
    red_team_prompts,
)

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    limit: int = 100  # questions per split (and red-team prompts); 0 = all
    k: int = 1  # chunks put into the prompt (SFT trains with one retrieved document)
    recall_k: int = 5
    max_new_tokens: int = 48
    batch_size: int = 64
    # the world store's embedder and index (the `retrieval` group's; its k is chat's and serve's, here `k` above)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)


def _batched(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _answers(rag: NanoRAG, questions: list[str], use_retrieval: bool, s: EvalSettings) -> list[str]:
    out = []
    for chunk in _batched(questions, s.batch_size):
        out += [a.text for a in rag.answer_batch(chunk, use_retrieval=use_retrieval, max_new_tokens=s.max_new_tokens)]
    return out


def chance_exact_match(world: World, items) -> float:
    """Expected exact match of guessing each attribute uniformly among the values the world uses for it."""
    values: dict[str, set[str]] = {}
    for e in world.entities:
        for key, value in e.attributes.items():
            values.setdefault(key, set()).add(value)
    return sum(1.0 / len(values[it.attribute]) for it in items) / max(1, len(items))


def retrieval_recall(world: World, retriever, k: int, limit: int) -> float:
    """Share of seen/unseen questions whose top-k hits include a document of the asked entity."""
    items = [it for split in ("seen", "unseen") for it in split_items(world, split, limit)]
    owner = {d.doc_id: d.entity for d in world.retrieval_documents()}
    hits = retriever.search_batch([it.question for it in items], k)
    return sum(any(owner[h.id] == it.entity for h in hs) for it, hs in zip(items, hits)) / max(1, len(items))


def _limit(items: list, limit: int) -> list:
    return items if not limit else items[:limit]


def split_items(world: World, split: str, limit: int) -> list[QAItem]:
    """The questions of `split` the evaluation asks: the first `limit` (0 = all)."""
    return _limit(qa_items(world, split), limit)


def is_right(item: QAItem, response: str, world: World) -> bool:
    """What the evaluation counts as right: the gold value in the response (`exact_match`), and for an entity nobody
    documented (split "unknown"), whose right answer is "I don't know", the honesty judge's full mark."""
    if item.split == "unknown":
        return judge(item.question, response, world).honesty == 1.0
    return exact_match(response, item.answer)


@torch.no_grad()
def evaluate(model, tokenizer, world: World, settings: EvalSettings | None = None) -> dict:
    """The evaluation as a dict (the shape of eval.json)."""
    s = settings or EvalSettings()
    model.eval()
    retriever = world_retriever(world, s.retrieval)
    rag = NanoRAG(model, tokenizer, retriever, k=s.k)
    result: dict = {"exact_match": {}, "chance_exact_match": {}, "n": {}}
    judged_prompts, judged_answers = [], []
    for split in SPLITS:
        items = split_items(world, split, s.limit)
        questions = [it.question for it in items]
        scores = {}
        for use in (True, False):
            answers = _answers(rag, questions, use, s)
            hits = [is_right(it, a, world) for it, a in zip(items, answers)]
            scores["with_retrieval" if use else "without_retrieval"] = sum(hits) / max(1, len(hits))
            if use:
                judged_prompts += questions
                judged_answers += answers
        result["exact_match"][split] = scores
        result["chance_exact_match"][split] = chance_exact_match(world, items) if split != "unknown" else 0.0
        result["n"][split] = len(items)
    red = _limit(red_team_prompts(world), s.limit)
    judged_prompts += red
    judged_answers += _answers(rag, red, True, s)
    verdicts = [judge(p, a, world) for p, a in zip(judged_prompts, judged_answers)]
    result["judges"] = {
        name: sum(getattr(v, name) for v in verdicts) / max(1, len(verdicts))
        for name in ("helpfulness", "harmlessness", "honesty")
    }
    result["n"]["red_team"] = len(red)
    result["retrieval"] = {f"recall_at_{s.recall_k}": retrieval_recall(world, retriever, s.recall_k, s.limit)}
    result["samples"] = [
        {"prompt": p, "response": a}
        for p, a in list(zip(judged_prompts, judged_answers))[:: max(1, len(verdicts) // 8)]
    ]
    return result


def eval_table(result: dict, title: str = "evaluation"):
    from rich.table import Table

    table = Table(title=title)
    for col in ("split", "exact match, with retrieval", "without retrieval", "chance"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, scores in result["exact_match"].items():
        table.add_row(
            split,
            f"{scores['with_retrieval']:.3f}",
            f"{scores['without_retrieval']:.3f}",
            f"{result['chance_exact_match'][split]:.3f}",
        )
    for name, value in result["judges"].items():
        table.add_row(f"judge: {name}", f"{value:.3f}", "", "")
    for name, value in result["retrieval"].items():
        table.add_row(f"retrieval: {name}", f"{value:.3f}", "", "")
    return table


def _run_section(run_dir: Path, section: str):
    """(config.yaml path, the section as a dict) from a run's saved config.yaml (the run dir or the model dir's
    parent) that has it, or None."""
    from omegaconf import OmegaConf

    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file():
            cfg = OmegaConf.load(candidate)
            if section in cfg:
                return candidate, OmegaConf.to_container(cfg[section], resolve=True)
    return None


def world_config_for(run_dir: Path) -> WorldConfig:
    """The world a run trained on, from its saved config.yaml (the run dir or the model dir's parent)."""
    found = _run_section(run_dir, "world")
    if found is not None:
        return WorldConfig.from_dict(found[1], f"{found[0]}: world")
    log.warning("no config.yaml with a world section beside %s: using the default world", run_dir)
    return WorldConfig()


def retrieval_settings_for(run_dir: Path) -> RetrievalSettings:
    """The world store's settings a run trained with (its config.yaml's `retrieval` group: the reward stage's
    context and the curriculum's evaluation used them), or, for a run that saved none, this installation's
    conf/retrieval/default.yaml. A bad key is named with the file."""
    from neuraflux.retrieval.documents import load_retrieval_settings, retrieval_settings
    from neuraflux.retrieval.errors import RetrievalError

    found = _run_section(run_dir, "retrieval")
    if found is None:
        return load_retrieval_settings()
    try:
        return retrieval_settings(found[1])
    except RetrievalError as err:
        raise ValueError(f"{found[0]}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neuraflux.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run directory, model directory or .ckpt file")
    p.add_argument("--limit", type=int, default=EvalSettings.limit, help="questions per split; 0 = all")
    p.add_argument("--k", type=int, default=EvalSettings.k, help="retrieved chunks in the prompt")
    p.add_argument("--out", type=Path, default=None, help="where to write eval.json (default: beside the model)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None, help="evaluate an int8 copy (torchao)")
    args = p.parse_args(argv)
    from neuraflux.model.io import load_for_inference
    from neuraflux.model.quantize import QuantizationError

    try:
        model, tokenizer = load_for_inference(args.model, args.quantize)
    except QuantizationError as err:
        raise SystemExit(f"error: --quantize {args.quantize}: {err}" if args.quantize else f"error: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --model {args.model}: {err}") from None
    source = Path(args.model)
    run_dir = source if source.is_dir() else source.parent
    try:
        retrieval = retrieval_settings_for(run_dir)  # a bad key is named before the world is built
        world = generate_world(world_config_for(run_dir))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    result = evaluate(model, tokenizer, world, EvalSettings(limit=args.limit, k=args.k, retrieval=retrieval))
    out = args.out or ((source if source.is_dir() else source.parent) / "eval.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    from rich.console import Console

    Console().print(eval_table(result, f"evaluation: {args.model}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
