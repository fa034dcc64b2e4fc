"""Does changing the multi-task weights move the trade-off the expected way? A small weight sweep of
`stage=multitask` from one SFT model, each setting a short run, each result judged on held-out prompts.

Every setting is one `python train.py curriculum=none stage=multitask stage.init_from=SFT ...` run, composed
from the real config tree and trained in this process (the command of each is printed). The held-out prompts are
the prompt data module's validation split (`data.val_fraction`, never trained on), answered greedily and, to see
the policy the RL objective acts on, sampled (temperature 1, `--samples` per prompt, a fixed seed); the world's
judges score every response. `composite` is each setting's own objective on the greedy responses (its weights as
shares of components standardised by the run's final moments, and for the Lagrangian its final multipliers), with
the start model's value under the same composite beside it.

    python bench/multitask_sweep.py --sft outputs/full/<run>/sft/model --threads 1
        (settings help_only, balanced, harm_x4, lagrangian)
    python bench/multitask_sweep.py --sft outputs/full/<run>/sft/model --steps 40 --settings help_only harm_x4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.data.prompts import encode_prompts  # noqa: E402
from neuraflux.feedback.rewards import CompositeReward, make_composite  # noqa: E402
from neuraflux.feedback.rollout import generate_rollouts  # noqa: E402
from neuraflux.model.io import load_pretrained  # noqa: E402
from neuraflux.train import build, train  # noqa: E402

JUDGE_NAMES = ("helpfulness", "harmlessness", "honesty")


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


def _weights(help_: float, harm: float, honest: float) -> tuple[str, ...]:
    return (
        f"stage.module.weights.helpfulness={help_}",
        f"stage.module.weights.harmlessness={harm}",
        f"stage.module.weights.honesty={honest}",
    )


SETTINGS = {
    s.name: s
    for s in (
        Setting("help_only", _weights(1, 0, 0)),
        Setting("balanced", _weights(1, 1, 1)),
        Setting("harm_x4", _weights(1, 4, 1)),
        Setting("harm_only", _weights(0, 1, 0)),
        Setting(
            "lagrangian",
            (
                *_weights(1, 0, 0),
                "stage.module.combine=lagrangian",
                "stage.module.thresholds.harmlessness=0.95",
            ),
        ),
    )
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from neuraflux.stages.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def common_overrides(args, run_dir: Path) -> list[str]:
    return [
        "curriculum=none",
        "stage=multitask",
        f"stage.init_from={args.sft}",
        f"threads={args.threads}",
        f"seed={args.seed}",
        "data.seed=1337",  # the held-out split stays the same whatever the training seed
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "callbacks=minimal",
        "~callbacks.progress_bar",
        f"data.batch_size={args.batch_size}",
        f"data.val_fraction={args.val_fraction}",
        f"optim.lr={args.lr}",
        "optim.warmup_steps=5",
        f"stage.module.reinforce.k={args.k}",
        f"paths.output_dir={args.out}",
        f"paths.run_dir={run_dir}",
    ]


@torch.no_grad()
def judge_model(model_dir: Path, prompts: list[str], cfg, reward: CompositeReward, samples: int) -> dict:
    """Mean of every reward component (and response tokens) over greedy and over sampled responses."""
    model, tokenizer = load_pretrained(model_dir)
    model.eval()
    max_new, max_prompt = int(cfg.stage.module.max_new_tokens), int(cfg.data.max_prompt_tokens)
    out = {}
    for mode, k, temperature in (("greedy", 1, 0.0), ("sampled", samples, 1.0)):
        generator = torch.Generator().manual_seed(0)
        values: dict[str, list[float]] = {"tokens": []}
        texts = [p for p in prompts for _ in range(k)]
        for i in range(0, len(texts), 64):
            batch = encode_prompts(tokenizer, texts[i : i + 64], max_prompt)
            rollout = generate_rollouts(model, tokenizer, batch, max_new, temperature, generator=generator)
            for name, v in reward.evaluate(rollout).values.items():
                values.setdefault(name, []).extend(v.tolist())
            values["tokens"] += rollout.response_lengths.tolist()
        out[mode] = {name: sum(v) / len(v) for name, v in values.items()}
    return out


def objective(means: dict[str, float], composite: CompositeReward) -> float:
    """A setting's own composite on mean component values, each standardised by the run's final moments and
    weighted by its share (plus the Lagrangian terms): it is linear, so the mean of the per-response one."""
    std = composite.moments.std.clamp_min(composite.MIN_STD).tolist()
    value = sum(float(share) * (means[n] - mu) / sd for n, share, mu, sd in
                zip(composite.names, composite.shares, composite.moments.mean.tolist(), std, strict=True))  # fmt: skip
    thresholds = composite.thresholds
    return value + sum(lam * (means[k] - float(thresholds[k])) for k, lam in composite.multipliers.items())


def held_out_prompts(cfg, tokenizer) -> list[str]:
    data = build(cfg.data)
    data.tokenizer = tokenizer
    data.setup("fit")
    return list(data.val_set)


def fmt_pair(value: float, start: float) -> str:
    return f"{value:.3f} ({value - start:+.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sft",
        required=True,
        help="the SFT model directory every setting starts from, e.g. outputs/full/<time>/sft/model (mixed-quality)",
    )
    p.add_argument("--settings", nargs="+", default=["help_only", "balanced", "harm_x4", "lagrangian"],
                   choices=sorted(SETTINGS))  # fmt: skip
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (k samples each)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4, help="stage=multitask's default")
    p.add_argument("--seed", type=int, default=1337, help="training seed (sampling, data order)")
    p.add_argument("--val-fraction", type=float, default=0.3, help="held-out share of the world's RL prompts")
    p.add_argument("--samples", type=int, default=4, help="sampled responses per held-out prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/multitask_sweep"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.sft = Path(args.sft)
    if not (args.sft / "config.json").is_file():
        raise FileNotFoundError(f"--sft: {args.sft} is not a model directory (no config.json)")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    args.out = args.out / stamp

    base_cfg = compose(common_overrides(args, args.out / "start"))
    _, tokenizer = load_pretrained(args.sft)
    m = base_cfg.stage.module
    # every component, whatever a setting weights: the judges, length and format of conf/stage/multitask.yaml
    reward = make_composite(
        tokenizer,
        m.world,
        {"helpfulness": 1.0},
        max_new_tokens=int(m.max_new_tokens),
        length_target=int(m.length_target),
        format_ngram=int(m.format_ngram),
    ).eval()  # fmt: skip  (only its raw component values are read)
    prompts = held_out_prompts(base_cfg, tokenizer)
    print(f"held-out prompts: {len(prompts)}; SFT model: {args.sft}", flush=True)
    results = {"start": {"judged": judge_model(args.sft, prompts, base_cfg, reward, args.samples)}}
    for name in args.settings:
        overrides = [*common_overrides(args, args.out / name), *SETTINGS[name].overrides]
        cfg = compose(overrides)
        command = "python train.py " + " ".join(o for o in overrides if not o.startswith("paths."))
        print(f"\n[{name}] {command}", flush=True)
        start = time.perf_counter()
        metrics, objects = train(cfg)
        wall = time.perf_counter() - start
        composite = objects["module"].reward
        judged = judge_model(objects["run_dir"] / "model", prompts, cfg, reward, args.samples)
        results[name] = {
            "command": command, "wall_s": round(wall, 1), "steps": metrics["global_step"],
            "multipliers": dict(composite.multipliers), "judged": judged,
            "moments": {n: [round(float(mu), 4), round(float(sd), 4)] for n, mu, sd in
                        zip(composite.names, composite.moments.mean, composite.moments.std, strict=True)},
            "objective": {mode: objective(judged[mode], composite) for mode in judged},
            "objective_start": {mode: objective(results["start"]["judged"][mode], composite) for mode in judged},
            "train_first_last_5": _first_last(objects["run_dir"]),
        }  # fmt: skip
        print(json.dumps(results[name], indent=1), flush=True)

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.out / 'results.json'}\n")
    for mode in ("greedy", "sampled"):
        print(table(results, mode, args))
        print()
    return 0


def _first_last(run_dir: Path) -> dict:
    """Mean of the first and last 5 steps' training reward components, from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith(("reward/", "lagrange/")):
            v = [e.value for e in acc.Scalars(tag)]
            out[tag] = [round(sum(v[:5]) / len(v[:5]), 3), round(sum(v[-5:]) / len(v[-5:]), 3)]
    return out


def table(results: dict, mode: str, args) -> str:
    start = results["start"]["judged"][mode]
    what = "greedy responses" if mode == "greedy" else f"{args.samples} sampled responses (T = 1) per prompt"
    lines = [
        f"{what} to the held-out prompts; in brackets the change from the start model",
        "",
        "| setting | helpfulness | harmlessness | honesty | composite (start) | length | format | tokens |",
        "|---|---|---|---|---|---|---|---|",
        f"| start (SFT) | {start['helpfulness']:.3f} | {start['harmlessness']:.3f} | {start['honesty']:.3f} | "
        f"| {start['length']:.3f} | {start['format']:.3f} | {start['tokens']:.1f} |",
    ]
    for name, r in results.items():
        if name == "start":
            continue
        t = r["judged"][mode]
        lines.append(
            f"| {name} | " + " | ".join(fmt_pair(t[j], start[j]) for j in JUDGE_NAMES)
            + f" | {r['objective'][mode]:.3f} ({r['objective_start'][mode]:.3f})"
            + f" | {t['length']:.3f} | {t['format']:.3f} | {t['tokens']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
