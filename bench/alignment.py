"""Whether the alignment stages work, measured on the built-in world.

Parts (`--parts`, all by default):

  policy   the SFT model (trained on mixed-quality data: rude, hallucinated, unsafe answers) measured, then each of
           `stage=dpo|ppo|reinforce` run from it as `python train.py curriculum=none stage=X stage.init_from=SFT ...`
           (the stage's config defaults; `--set` adds overrides) and the result measured with `measure_policy` on
           the held-out RL prompts: the judges' means, their mean, and the KL to the SFT model (the reference)
  reward   `stage=reward` on the world's judge-labelled pairs; accuracy on the pairs of held-out prompts
  hh       `stage=reward data=preference data.path=HH`: accuracy on a held-out split of the hh-rlhf file (chance 0.5)
  rollout  PPO's rollout (sample + score + reward + KL) against the batched KV-cached generator alone, same prompts
           and the same sampled tokens; the PPO run's own time split comes from its `time/rollout_s`, `time/learn_s`

Every run holds out the same prompts (about a quarter of the 276 with the default --val-fraction 0.25: 77 with
seed 1337): `data.val_fraction` and `data.seed` are passed to all of them, and the shared split (`data.splits`) makes
PPO/REINFORCE's prompt split and the preference split (whole prompts) pick the same ones, which `held_out_prompts`
measures on. `--train-seeds` varies `seed` (initialisation, sampling) only.
Wall seconds include starting Python; CPU seconds are the run's own (user + system), which is what a loaded machine
does not inflate. Prints markdown tables and writes everything to OUT/alignment.json.

    python bench/alignment.py --sft outputs/full/<time>/sft/model --threads 1 --train-seeds 1337 1 --out OUT
    python bench/alignment.py --sft outputs/full/<time>/sft/model --out OUT --parts policy --reuse   # re-measure OUT
    python bench/alignment.py --sft RUN/sft/model --parts policy --stages ppo --set ppo:stage.module.kl_coef=0.1
    python bench/alignment.py --sft RUN/sft/model --parts hh --hh ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.data.preference_batches import PreferenceDataModule, split_by_prompt  # noqa: E402
from neuraflux.data.prompts import encode_prompts  # noqa: E402
from neuraflux.eval import world_config_for  # noqa: E402
from neuraflux.feedback.constitution import Constitution  # noqa: E402
from neuraflux.feedback.measure import PolicyMeasure, held_out_prompts, measure_policy, render  # noqa: E402
from neuraflux.model import generate  # noqa: E402
from neuraflux.model.io import load_pretrained  # noqa: E402
from neuraflux.model.reward import NanoRewardModel  # noqa: E402
from neuraflux.world import generate_world  # noqa: E402
from neuraflux.world.judges import judge  # noqa: E402

POLICY_STAGES = ("dpo", "ppo", "reinforce", "grpo", "kto")
DEFAULT_STAGES = ("dpo", "ppo", "reinforce")  # grpo and kto on request (--stages): each adds minutes
PARTS = ("policy", "reward", "hh", "rollout")
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def run_stage(stage: str, run_dir: Path, sft: Path, args, extra: list[str], train_seed: int | None = None) -> dict:
    """One `python train.py` run; returns the command, wall and CPU seconds, and its metrics.json.

    `data.seed` (the held-out split) is always `--seed`; `seed` (initialisation, sampling) is `train_seed`.
    """
    cmd = [
        sys.executable, "train.py", "curriculum=none", f"stage={stage}", f"stage.init_from={sft}",
        f"threads={args.threads}", f"seed={args.seed if train_seed is None else train_seed}",
        f"data.seed={args.seed}", f"data.val_fraction={args.val_fraction}",
        f"paths.run_dir={run_dir}", "~callbacks.progress_bar", *extra,
    ]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log_file:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shown = " ".join(c if c != sys.executable else "python" for c in cmd)
    return {"command": shown, "wall_s": wall, "cpu_s": cpu, "metrics": metrics}


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def as_dict(m: PolicyMeasure) -> dict:
    return {
        "judges": m.judges,
        "kl": m.kl,
        "violations": m.violations,
        "reward": m.reward,
        "n": m.n,
        "samples": m.samples,
    }


# ---- policy: dpo, ppo, reinforce from the mixed SFT model ------------------------------------------------------
def policy_part(args, out: Path, world, prompts, constitution) -> dict:
    """Each stage run (or, with --reuse, read back from OUT) and measured on the held-out and the training prompts."""
    sft_model, tok = load_pretrained(args.sft)
    train_prompts = held_out_prompts(world, "train", args.val_fraction, args.seed)
    measure = lambda model, on=prompts: measure_policy(  # noqa: E731
        model, tok, world, on, reference=sft_model, constitution=constitution, seed=args.seed
    )
    before, before_train = measure(sft_model), measure(sft_model, train_prompts)
    rows = {"sft": {"measure": as_dict(before), "measure_train": as_dict(before_train), "steps": 0}}
    previous = json.loads((out / "alignment.json").read_text()).get("policy", {}) if args.reuse else {}
    print(f"sft: {fmt_judges(before)}", flush=True)
    for stage, train_seed in ((s, t) for s in args.stages for t in args.train_seeds):
        name = stage if len(args.train_seeds) == 1 else f"{stage} (seed {train_seed})"
        run_dir = out / (stage if len(args.train_seeds) == 1 else f"{stage}_seed{train_seed}")
        if name in previous:
            run = {k: previous[name][k] for k in ("command", "wall_s", "cpu_s", "metrics")}
        else:
            run = run_stage(stage, run_dir, args.sft, args, args.overrides.get(stage, []), train_seed)
        model, _ = load_pretrained(run_dir / "model")
        m, m_train = measure(model), measure(model, train_prompts)
        row = {
            **run,
            "steps": int(run["metrics"]["global_step"]),
            "measure": as_dict(m),
            "train_seed": train_seed,
            "gap_closed": 1.0 - m.gap / before.gap if before.gap > 0 else None,
            "measure_train": as_dict(m_train),
            "gap_closed_train": 1.0 - m_train.gap / before_train.gap,
        }
        tags = scalars(run_dir)
        if "time/rollout_s" in tags:
            # logged every trainer.log_every_n_steps: means over the logged steps
            row["time"] = {
                "rollout_s": statistics.mean(tags["time/rollout_s"]),
                "learn_s": statistics.mean(tags["time/learn_s"]),
                "logged_steps": len(tags["time/rollout_s"]),
            }
        if "objective/kl" in tags:
            row["train_kl_last"] = tags["objective/kl"][-1]
        rows[name] = row
        print(
            f"{name}: {fmt_judges(m)} KL {m.kl:.2f}, gap closed {row['gap_closed']:.2f}, "
            f"{run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} s CPU",
            flush=True,
        )
    return rows


def fmt_judges(m: PolicyMeasure) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.judges.items())


def policy_table(rows: dict, threads: int, key: str = "measure") -> str:
    lines = [
        "| stage | steps | wall s | CPU s | threads | helpfulness | harmlessness | honesty | mean | gap closed | KL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, row in rows.items():
        j, kl = row[key]["judges"], row[key]["kl"]
        closed = "–" if stage == "sft" else f"{row['gap_closed' + key.removeprefix('measure')]:.2f}"
        wall = "–" if stage == "sft" else f"{row['wall_s']:.0f}"
        cpu = "–" if stage == "sft" else f"{row['cpu_s']:.0f}"
        lines.append(
            f"| {stage} | {row['steps']} | {wall} | {cpu} | {threads} | {j['helpfulness']:.3f} | "
            f"{j['harmlessness']:.3f} | {j['honesty']:.3f} | {j['mean']:.3f} | {closed} | {kl:.2f} |"
        )
    return "\n".join(lines)


# ---- reward models ---------------------------------------------------------------------------------------------
@torch.no_grad()
def pair_correct(model: NanoRewardModel, dm: PreferenceDataModule, split: str) -> list[bool]:
    """Per pair of `split`, in order: does the chosen response score higher?"""
    model.eval()
    right: list[bool] = []
    for batch in dm.sequential_loader(split):
        r = batch.pair(model.score(batch.input_ids, batch.attention_mask))
        right += (r.chosen > r.rejected).tolist()
    return right


def by_judge(world, examples, right: list[bool]) -> dict[str, list[float]]:
    """Accuracy and count per set of judges that score the two responses differently, e.g. "honesty" alone."""
    groups: dict[str, list[bool]] = {}
    for ex, ok in zip(examples, right, strict=True):
        c, r = judge(ex.prompt, ex.chosen, world), judge(ex.prompt, ex.rejected, world)
        names = [n for n in ("helpfulness", "harmlessness", "honesty") if getattr(c, n) != getattr(r, n)]
        groups.setdefault("+".join(names), []).append(ok)
    return {k: [sum(v) / len(v), len(v)] for k, v in sorted(groups.items())}


def reward_part(args, out: Path, name: str, extra: list[str], data: dict) -> dict:
    """A reward model trained by `stage=reward`, scored on its run's own train and val pairs."""
    run = run_stage("reward", out / name, args.sft, args, extra)
    model = NanoRewardModel.from_pretrained(out / name / "model")
    _, tok = load_pretrained(out / name / "model")
    if "world" in data:  # the run's own world: `--set reward:world.pairs_per_prompt=7` changes the pairs
        from omegaconf import OmegaConf

        run_cfg = OmegaConf.load(out / name / "config.yaml")
        data = {
            **data,
            "world": dict(world_config_for(out / name).__dict__),
            "retrieve_context": bool(run_cfg.data.get("retrieve_context", False)),
        }
    dm = PreferenceDataModule(
        **data, max_length=model.config.block_size, val_fraction=args.val_fraction, seed=args.seed
    )
    dm.tokenizer = tok
    dm.setup()
    val_right, train_right = pair_correct(model, dm, "val"), pair_correct(model, dm, "train")
    val_acc, n_val = sum(val_right) / len(val_right), len(val_right)
    train_acc, n_train = sum(train_right) / len(train_right), len(train_right)
    held_out = split_by_prompt(dm.dataset, args.val_fraction, args.seed).test
    row = {
        **run,
        "val_accuracy": val_acc,
        "val_pairs": n_val,
        "train_accuracy": train_acc,
        "train_pairs": n_train,
        "steps": int(run["metrics"]["global_step"]),
        "val_prompts": len({e.prompt for e in held_out}),
    }
    if "world" in data:
        row["val_by_judge"] = by_judge(generate_world(world_config_for(out / name)), list(held_out), val_right)
    print(
        f"reward ({name}): held-out accuracy {val_acc:.3f} on {n_val} pairs, train {train_acc:.3f} on {n_train}, "
        f"{run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} s CPU",
        flush=True,
    )
    return row


# ---- rollout speed ---------------------------------------------------------------------------------------------
def rollout_part(args, world_cfg: dict, prompts_texts: list[str]) -> dict:
    """PPO's make_rollout against generate() alone on the same batches, the same seeded samples, alternating."""
    from neuraflux.optim import OptimizerFactory
    from neuraflux.stages.ppo import NanoPPO

    model, tok = load_pretrained(args.sft)
    ppo = NanoPPO(model, tok, OptimizerFactory(), reference_path=str(args.sft), world=world_cfg)
    n = args.rollout_batch
    batches = [
        encode_prompts(tok, prompts_texts[i : i + n], model.config.block_size)
        for i in range(0, n * args.rollout_batches, n)
    ]
    stop = [tok.end_id, tok.eos_id]
    ppo.make_rollout(batches[0])  # warm-up
    times: dict[str, list[float]] = {"rollout": [], "generate": []}
    tokens = 0
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        rollout = ppo.make_rollout(batch)
        times["rollout"].append(time.perf_counter() - t0)
        torch.manual_seed(i)
        t0 = time.perf_counter()
        seq = generate(
            model,
            batch.input_ids,
            ppo.sampling.max_new_tokens,
            1.0,
            eos_token_id=stop,
            attention_mask=batch.attention_mask,
            pad_token_id=tok.pad_id,
        )
        times["generate"].append(time.perf_counter() - t0)
        if not torch.equal(seq, rollout.input_ids):
            raise RuntimeError("the rollout and the generator sampled different tokens under one seed")
        tokens += rollout.response_ids.numel()  # decoding steps x rows: the work both did
    total = {k: sum(v) for k, v in times.items()}
    row = {
        "batches": len(batches),
        "batch_size": n,
        "max_new_tokens": ppo.sampling.max_new_tokens,
        "tokens": tokens,
        "rollout_s": total["rollout"],
        "generate_s": total["generate"],
        "rollout_tokens_per_s": tokens / total["rollout"],
        "generate_tokens_per_s": tokens / total["generate"],
        "median_ratio": statistics.median(g / r for g, r in zip(times["generate"], times["rollout"], strict=True)),
    }
    print(
        f"rollout: {row['rollout_tokens_per_s']:.0f} tokens/s (sample + score + judges + KL) vs generator alone "
        f"{row['generate_tokens_per_s']:.0f} tokens/s: {total['generate'] / total['rollout']:.2f}x",
        flush=True,
    )
    return row


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """`stage:key=value` overrides, grouped by stage (`all:` applies to every policy stage)."""
    by_stage: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise SystemExit(
                f"--set {item!r}: expected STAGE:key=value (STAGE one of {POLICY_STAGES}, reward, hh, all)"
            )
        by_stage.setdefault(stage, []).append(override)
    shared = by_stage.pop("all", [])
    return {s: shared + by_stage.get(s, []) for s in (*POLICY_STAGES, "reward", "hh")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, required=True, help="the mixed-quality SFT model directory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337, help="the held-out split's seed (data.seed)")
    p.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="policy stages: one run per training seed (default: --seed)",
    )
    p.add_argument("--val-fraction", type=float, default=0.25, help="held-out share of the RL prompts")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--stages", nargs="+", choices=POLICY_STAGES, default=list(DEFAULT_STAGES))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:KEY=VALUE")
    p.add_argument("--hh", type=Path, default=HH)
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--rollout-batches", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="default: outputs/bench/alignment/<time>")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="policy: measure the models an earlier run left in OUT (its alignment.json) instead of training",
    )
    args = p.parse_args()
    args.sft = args.sft.resolve()
    args.overrides = parse_sets(args.sets)
    args.train_seeds = args.train_seeds or [args.seed]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or ROOT / "outputs" / "bench" / "alignment" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)

    world_cfg = world_config_for(args.sft)
    world = generate_world(world_cfg)
    prompts = held_out_prompts(world, "val", args.val_fraction, args.seed)
    from omegaconf import OmegaConf

    constitution = Constitution.from_config(OmegaConf.load(ROOT / "conf" / "constitution" / "default.yaml"))
    result: dict = {
        "date": stamp,
        "threads": args.threads,
        "sft": str(args.sft),
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "held_out_prompts": len(prompts),
        "world": world_cfg.__dict__,
        "torch": torch.__version__,
    }
    print(
        f"{stamp} UTC, torch {torch.__version__}, {args.threads} thread(s); SFT {args.sft}; "
        f"{len(prompts)} held-out prompts (val_fraction {args.val_fraction}, seed {args.seed}); out {out}",
        flush=True,
    )
    world_dict = dict(world_cfg.__dict__)
    if "policy" in args.parts:
        result["policy"] = policy_part(args, out, world, prompts, constitution)
    if "reward" in args.parts:
        result["reward_world"] = reward_part(
            args, out, "reward_world", args.overrides["reward"], {"builtin": "world", "world": world_dict}
        )
    if "hh" in args.parts:
        extra = ["data=preference", f"data.path={args.hh.resolve()}", *args.overrides["hh"]]
        result["reward_hh"] = reward_part(args, out, "reward_hh", extra, {"path": str(args.hh.resolve())})
    if "rollout" in args.parts:
        train_texts = [render(q) for q in held_out_prompts(world, "train", args.val_fraction, args.seed)]
        result["rollout"] = rollout_part(args, world_dict, train_texts)
    if args.reuse and (out / "alignment.json").is_file():  # keep the parts this call did not redo
        result = {**json.loads((out / "alignment.json").read_text()), **result}
    (out / "alignment.json").write_text(json.dumps(result, indent=2) + "\n")

    if "policy" in result:
        print(f"\nheld-out prompts ({len(prompts)}):\n" + policy_table(result["policy"], args.threads))
        print("\ntraining prompts:\n" + policy_table(result["policy"], args.threads, "measure_train"))
    for key in ("reward_world", "reward_hh"):
        if key in result:
            r = result[key]
            print(
                f"\n{key}: held-out accuracy {r['val_accuracy']:.3f} ({r['val_pairs']} pairs; chance 0.5), "
                f"train {r['train_accuracy']:.3f} ({r['train_pairs']}), {r['steps']} steps, {r['wall_s']:.0f} s"
            )
            for judges, (acc, n) in r.get("val_by_judge", {}).items():
                print(f"  pairs told apart by {judges}: {acc:.2f} ({n})")
    for stage, row in result.get("policy", {}).items():
        t = row.get("time")
        if t:
            share = t["rollout_s"] / (t["rollout_s"] + t["learn_s"])
            print(
                f"\n{stage} run: rollout {t['rollout_s']:.2f} s, learn {t['learn_s']:.2f} s a step (mean of "
                f"{t['logged_steps']} logged steps): {share:.0%} rollout"
            )
    print(f"\nwritten {out / 'alignment.json'}")


if __name__ == "__main__":
    main()
