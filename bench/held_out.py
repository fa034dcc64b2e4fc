"""What the held-out world prompts show, for the stages' reward model and policies.

`pairs RM_DIR`: held-out pair accuracy of an exported reward model, by pair type and by whether the prompt carries
context. The world's pairs split as `stage=reward` splits them (whole prompts held out); a model trained with
`data.retrieve_context` (its `reward_model.json` says so) is scored on prompts given the same retrieved context. A
pair type is the set of judges that score its two responses differently.

`answers MODEL`: the held-out RL prompts (as `bench/alignment.py` holds them out) whose greedy answer scores below
full marks, with the three judge scores.

`gaps MODEL [MODEL ...]`: where each model loses judge points (3 a prompt), by prompt category, on the held-out and
on the training prompts: closed-book questions on seen entities (recall), questions with context (reading), unknown
entities, red-team prompts. The first model is the baseline each later one's "gap closed" is measured against.

    python bench/held_out.py pairs outputs/full/<time>/reward/model --threads 1 [--wrong]
    python bench/held_out.py answers outputs/full/<time>/sft/model --threads 1
    python bench/held_out.py gaps SFT OUT/reinforce_seed1337/model OUT/dpo_seed1337/model --threads 1
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neuraflux.chat import context_of  # noqa: E402
from neuraflux.data.preference_batches import PreferenceDataModule, split_by_prompt  # noqa: E402
from neuraflux.eval import world_config_for  # noqa: E402
from neuraflux.feedback.measure import held_out_prompts, measure_policy, render  # noqa: E402
from neuraflux.model.io import load_pretrained  # noqa: E402
from neuraflux.model.reward import NanoRewardModel  # noqa: E402
from neuraflux.world import generate_world, judge  # noqa: E402
from neuraflux.world.generator import question_text  # noqa: E402
from neuraflux.world.schema import RED_TEAM_CATEGORIES  # noqa: E402

JUDGES = ("helpfulness", "harmlessness", "honesty")


def where(prompt: str) -> str:
    return "context" if context_of(prompt) is not None else "closed-book"


def pairs(args) -> None:
    model = NanoRewardModel.from_pretrained(args.model).eval()
    _, tokenizer = load_pretrained(args.model)
    world_cfg = world_config_for(args.model)
    world = generate_world(world_cfg)
    dm = PreferenceDataModule(
        builtin="world",
        world=dict(world_cfg.__dict__),
        max_length=model.config.block_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        retrieve_context=model.retrieve_context,
    )
    dm.tokenizer = tokenizer
    dm.setup()
    held = list(split_by_prompt(dm.dataset, args.val_fraction, args.seed).test)  # the pairs as generated
    right: list[bool] = []
    with torch.no_grad():
        for batch in dm.sequential_loader("val"):
            r = batch.pair(model.score(batch.input_ids, batch.attention_mask))
            right += (r.chosen > r.rejected).tolist()
    groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for ex, ok in zip(held, right, strict=True):
        c, r = judge(ex.prompt, ex.chosen, world), judge(ex.prompt, ex.rejected, world)
        kind = "+".join(n for n in JUDGES if getattr(c, n) != getattr(r, n))
        groups[(kind, where(ex.prompt))].append(ok)
        if args.wrong and not ok:
            print(f"wrong ({kind}): {ex.prompt[-90:]!r} | chosen {ex.chosen!r} | rejected {ex.rejected!r}")
    print(
        f"{args.model}: held-out accuracy {sum(right) / len(right):.3f} on {len(right)} pairs "
        f"(retrieved context: {model.retrieve_context})"
    )
    for (kind, place), oks in sorted(groups.items()):
        print(f"  {kind:<36} {place:<12} {sum(oks) / len(oks):.2f} ({len(oks)})")


def greedy_answers(model, tokenizer, world, split: str, args) -> tuple[list[str], list[str]]:
    """The rendered prompts of `split` ("val" or "train") and the model's greedy answers, as `bench/alignment.py`
    measures them (`measure_policy`: same prompt budget, same batches)."""
    prompts = held_out_prompts(world, split, args.val_fraction, args.seed)
    answers = measure_policy(model, tokenizer, world, prompts, max_new_tokens=args.max_new_tokens).responses
    return [render(x) for x in prompts], answers


def load_policy(model_dir: Path):
    model, tokenizer = load_pretrained(model_dir)
    return model, tokenizer, generate_world(world_config_for(model_dir))


def category(text: str, world) -> str:
    parsed = world.parse_prompt(text)
    if parsed.kind in RED_TEAM_CATEGORIES:
        return "red-team"
    if parsed.entity is not None and parsed.entity.split == "unknown":
        return "unknown entity"
    return "with context" if context_of(text) is not None else "closed-book recall"


CATEGORIES = ("closed-book recall", "with context", "unknown entity", "red-team")


def gaps(args) -> None:
    splits = {"val": "held-out", "train": "training"}
    lost: dict[str, list[dict[str, float]]] = {split: [] for split in splits}
    counts: dict[str, dict[str, int]] = {}
    for model_dir in args.models:
        model, tokenizer, world = load_policy(model_dir)
        for split in splits:
            texts, answers = greedy_answers(model, tokenizer, world, split, args)
            row = dict.fromkeys(CATEGORIES, 0.0)
            counts[split] = dict.fromkeys(CATEGORIES, 0)
            for text, answer in zip(texts, answers, strict=True):
                cat = category(text, world)
                row[cat] += 3.0 - judge(text, answer, world).total
                counts[split][cat] += 1
            lost[split].append(row)
    for split, name in splits.items():
        n = counts[split]
        print(
            f"\n{name} prompts ({sum(n.values())}): judge points lost (of 3 a prompt); gap closed against the "
            f"first model"
        )
        print("| model | " + " | ".join(f"{c} ({n[c]})" for c in CATEGORIES) + " | total | gap closed |")
        print("|---|" + "---:|" * (len(CATEGORIES) + 2))
        base = sum(lost[split][0].values())
        for model_dir, row in zip(args.models, lost[split], strict=True):
            total = sum(row.values())
            closed = f"{1 - total / base:.2f}" if base > 0 else "–"
            print(
                f"| {model_dir} | " + " | ".join(f"{row[c]:.2f}" for c in CATEGORIES) + f" | {total:.2f} | {closed} |"
            )


def answers(args) -> None:
    model, tokenizer, world = load_policy(args.model)
    texts, answers = greedy_answers(model, tokenizer, world, "val", args)
    short = 0
    for text, answer in zip(texts, answers, strict=True):
        j = judge(text, answer, world)
        if j.total < 3:
            short += 1
            print(
                f"help {j.helpfulness:.2f} harm {j.harmlessness:.0f} honest {j.honesty:.0f} ({where(text)}): "
                f"{question_text(text)!r} -> {answer!r}"
            )
    print(f"{short} of {len(texts)} held-out prompts below full marks")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["pairs", "answers", "gaps"])
    p.add_argument(
        "models",
        type=Path,
        nargs="+",
        help="a reward model (pairs) or policy (answers) model directory; gaps: several policies",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--wrong", action="store_true", help="pairs: also print every held-out pair ranked wrong")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answers: greedy answer length")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part != "gaps" and len(args.models) > 1:
        p.error(f"{args.part} takes one model directory")
    args.model = args.models[0]
    {"pairs": pairs, "answers": answers, "gaps": gaps}[args.part](args)


if __name__ == "__main__":
    main()
