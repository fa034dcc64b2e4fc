"""The world's questions as an lm-evaluation-harness task, and the exported model scored by it beside NeuraFlux's own
evaluation: proof that a model leaving NeuraFlux (`neuraflux export --format hf`) is scored the same outside.

python -m neuraflux.harness --model outputs/full/<time>/multitask/model --out harness/ [--limit 100]

It writes, under --out: `hf/` (the transformers export), `task/` (one lm-evaluation-harness task per entity split,
with and without retrieval: YAML, a local JSON-lines file of the questions, and `utils.py`), then runs lm_eval's
`simple_evaluate` offline on the exported model and prints its exact match beside `neuraflux.eval`'s, per task, with
how many of the two's answers are the same text. `comparison.json` holds the figures and every answer.

What the task holds is what the evaluation asks: each question's retrieved context is the one `NanoRAG` put in the
prompt (top-k chunks, cut to the context budget), given to lm_eval as the task's description, which its chat-template
mode passes as the system message, and which the exported chat template renders as the context turn: the prompt
lm_eval sends is NeuraFlux's prompt, character for character. Decoding is greedy until `<|end|>` or `<|eos|>`, up to
the evaluation's `max_new_tokens`. Scoring is `neuraflux.eval.is_right`, imported by the task's `utils.py`: the
gold value as whole words after normalisation, and the honesty judge for the unknown entities.

The same task runs from lm_eval's command line:

HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=harness/hf,dtype=float32 \\
    --include_path harness/task --tasks neuraflux_world --apply_chat_template --batch_size 1 --device cpu

Only this module imports lm_eval (`pip install 'neuraflux[harness]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from neuraflux.chat import END, parse_prompt
from neuraflux.eval import EvalSettings, evaluate, is_right, retrieval_settings_for, split_items, world_config_for
from neuraflux.model import NanoLM
from neuraflux.rag import NanoRAG, world_retriever
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import SPLITS, QAItem, World, WorldConfig, generate_world

log = logging.getLogger(__name__)

EXTRA = "harness"
GROUP = "neuraflux_world"
WORLD_FILE = "world.json"
MODES = {True: "with_retrieval", False: "without_retrieval"}  # eval.json's names


def require_lm_eval():
    """The lm_eval module, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            f"running lm-evaluation-harness needs the `lm-eval` package: pip install 'neuraflux[{EXTRA}]'"
        ) from None
    return lm_eval


def task_name(split: str, use_retrieval: bool) -> str:
    return f"{GROUP}_{split}_{MODES[use_retrieval]}"


@dataclass
class Question:
    """One question as both evaluations see it: NeuraFlux's prompt and answer, and what the task file holds."""

    item: QAItem
    use_retrieval: bool
    context: str  # the retrieved text in NeuraFlux's prompt ("" without retrieval)
    prompt: str  # NeuraFlux's rendered prompt
    neuraflux_answer: str


def ask(model: NanoLM, tokenizer: NanoTokenizer, world: World, settings: EvalSettings) -> list[Question]:
    """Every question the evaluation asks, with and without retrieval, answered by NeuraFlux's own RAG path (the
    one `neuraflux.eval.evaluate` calls, with its settings)."""
    model.eval()
    rag = NanoRAG(model, tokenizer, world_retriever(world), k=settings.k)
    out = []
    for split in SPLITS:
        items = split_items(world, split, settings.limit)
        for use in (True, False):
            for i in range(0, len(items), settings.batch_size):
                batch = items[i : i + settings.batch_size]
                answers = rag.answer_batch(
                    [it.question for it in batch], use_retrieval=use, max_new_tokens=settings.max_new_tokens
                )
                for it, a in zip(batch, answers, strict=True):
                    _, context = parse_prompt(a.prompt)
                    out.append(Question(it, use, context or "", a.prompt, a.text))
    return out


def write_task(directory: str | Path, questions: list[Question], world_config: WorldConfig, max_new_tokens: int):
    """The lm-evaluation-harness tasks of `questions` in `directory`: per split and retrieval mode a YAML and a
    JSON-lines file (absolute paths, so lm_eval runs from any directory), the group `neuraflux_world`, `utils.py`
    (NeuraFlux's scoring) and `world.json` (the world the unknown-entity judge reads). Returns the task names."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WORLD_FILE).write_text(json.dumps(dataclasses.asdict(world_config), indent=2) + "\n")
    (directory / "utils.py").write_text(
        "# written by python -m neuraflux.harness: the task is scored by NeuraFlux's own evaluation\n"
        "from neuraflux.harness import process_results  # noqa: F401\n"
    )
    names = []
    for split in SPLITS:
        for use in (True, False):
            name = task_name(split, use)
            rows = [q for q in questions if q.item.split == split and q.use_retrieval == use]
            if not rows:
                continue
            data = directory / f"{name}.jsonl"
            data.write_text("".join(json.dumps(document(q, directory)) + "\n" for q in rows))
            (directory / f"{name}.yaml").write_text(task_yaml(name, data, max_new_tokens))
            names.append(name)
    group = {"group": GROUP, "task": names}
    (directory / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return names


def document(q: Question, directory: Path) -> dict:
    """One line of a task's data file."""
    it = q.item
    return {
        "question": it.question,
        "context": q.context,
        "answer": it.answer,
        "entity": it.entity,
        "attribute": it.attribute,
        "split": it.split,
        "world": str(directory / WORLD_FILE),
    }


def task_yaml(name: str, data: Path, max_new_tokens: int) -> str:
    """A generate_until task: the question as the user turn, its retrieved context as the description (a system
    message, the context turn in the exported template), greedy decoding, NeuraFlux's scoring."""
    config = {
        "task": name,
        "tag": [GROUP],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "description": "context",  # a field name: lm_eval reads the document's field
        "doc_to_text": "question",
        "doc_to_target": "answer",
        "generation_kwargs": {"until": [END], "do_sample": False, "max_gen_toks": max_new_tokens},
        "process_results": "PROCESS_RESULTS",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    # lm_eval's YAML tag for a function in the task directory's utils.py
    return yaml.safe_dump(config, sort_keys=False).replace("PROCESS_RESULTS", "!function utils.process_results")


@functools.lru_cache(maxsize=4)
def _world(path: str) -> World:
    return generate_world(WorldConfig.from_dict(json.loads(Path(path).read_text()), path))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm_eval's per-document scoring hook: `neuraflux.eval.is_right` on the generated text."""
    item = QAItem(doc["question"], doc["entity"], doc["attribute"], doc["answer"], doc["split"])
    return {"exact_match": float(is_right(item, results[0], _world(doc["world"])))}


def run_lm_eval(model_dir: str | Path, task_dir: str | Path, tasks: list[str], batch_size: int = 1) -> dict:
    """lm_eval's `simple_evaluate` on the transformers directory, offline, with the chat template applied. Returns
    {task: {"exact_match": float, "answers": [str], "prompts": [str]}} with answers in the data file's order."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        device="cpu",
        apply_chat_template=True,
        log_samples=True,
        random_seed=0,
    )
    out = {}
    for name in tasks:
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        out[name] = {
            "exact_match": results["results"][name]["exact_match,none"],
            "answers": [s["filtered_resps"][0] for s in samples],
            "prompts": [s["arguments"][0][0] for s in samples],
        }
    return out


def compare(model_dir: str | Path, out: str | Path, settings: EvalSettings | None = None, batch_size: int = 1) -> dict:
    """Export the model, write the task, run both evaluations; the comparison as a dict (comparison.json)."""
    from neuraflux.model.export import export_model
    from neuraflux.model.io import load_for_inference

    model_dir, out = Path(model_dir), Path(out)
    s = settings or EvalSettings(retrieval=retrieval_settings_for(model_dir))
    model, tokenizer = load_for_inference(model_dir)
    world_config = world_config_for(model_dir)
    world = generate_world(world_config)
    hf_dir = export_model(model_dir, out / "hf", force=True)
    questions = ask(model, tokenizer, world, s)
    tasks = write_task(out / "task", questions, world_config, s.max_new_tokens)
    theirs = run_lm_eval(hf_dir, out / "task", tasks, batch_size)
    ours = evaluate(model, tokenizer, world, s)["exact_match"]
    rows = []
    for name in tasks:
        asked = [q for q in questions if task_name(q.item.split, q.use_retrieval) == name]
        split, use = asked[0].item.split, asked[0].use_retrieval
        lm = theirs[name]
        rows.append(
            {
                "task": name,
                "split": split,
                "use_retrieval": use,
                "n": len(asked),
                "neuraflux": ours[split][MODES[use]],
                "lm_eval": lm["exact_match"],
                "same_answers": sum(q.neuraflux_answer == a.strip() for q, a in zip(asked, lm["answers"])),
                "same_prompts": sum(q.prompt == p for q, p in zip(asked, lm["prompts"])),
                "answers": [
                    {"question": q.item.question, "neuraflux": q.neuraflux_answer, "lm_eval": a}
                    for q, a in zip(asked, lm["answers"])
                ],
            }
        )
    result = {"model": str(model_dir), "limit": s.limit, "k": s.k, "max_new_tokens": s.max_new_tokens, "tasks": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def comparison_table(result: dict):
    from rich.table import Table

    table = Table(title=f"exact match: NeuraFlux's evaluation and lm-evaluation-harness ({result['model']})")
    for col in ("split", "retrieval", "n", "neuraflux", "lm_eval", "same answers", "same prompts"):
        table.add_column(col, justify="left" if col in ("split", "retrieval") else "right")
    for r in result["tasks"]:
        table.add_row(
            r["split"], "with" if r["use_retrieval"] else "without", str(r["n"]), f"{r['neuraflux']:.3f}",
            f"{r['lm_eval']:.3f}", f"{r['same_answers']}/{r['n']}", f"{r['same_prompts']}/{r['n']}",
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neuraflux.harness", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run directory or model directory")
    p.add_argument("--out", type=Path, required=True, help="where the export, the task and comparison.json go")
    p.add_argument("--limit", type=int, default=EvalSettings.limit, help="questions per split; 0 = all")
    p.add_argument("--k", type=int, default=EvalSettings.k, help="retrieved chunks in the prompt")
    p.add_argument("--batch-size", type=int, default=1, help="lm_eval's generation batch (1: no padding)")
    args = p.parse_args(argv)
    try:
        settings = EvalSettings(limit=args.limit, k=args.k, retrieval=retrieval_settings_for(Path(args.model)))
        result = compare(args.model, args.out, settings, args.batch_size)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    from rich.console import Console

    Console().print(comparison_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
