"""Online rounds against the offline chain, from one SFT model: which closes more of the judges' gap on held-out
prompts, at what KL, in what wall time.

For each training seed, back to back (the order alternates between seeds, so neither always runs on a warmer or
quieter machine):

  offline  python train.py curriculum=full curriculum.start_at=reward curriculum.init_from=SFT
           (reward -> PPO -> DPO -> constitutional -> multi-task, the default chain after SFT)
  online   python train.py curriculum=online curriculum.stages=[] curriculum.init_from=SFT
           (curriculum.rounds rounds of label -> reward model -> policy; --online adds overrides)

both with the same `held_out_fraction`, `seed` and `threads`. Each run's report.json gives the final policy's judges
mean on the held-out prompts and its KL to the SFT model; the SFT model's own mean is measured here the same way
(greedy answers to the same prompts). Gap closed = (final - SFT) / (1 - SFT). Wall: the curriculum's stages and
labelling (training) and its measurements after each policy, as report.json counts them; CPU: the whole
process's user + system seconds, which a busy machine inflates far less than wall time.

    python bench/online_rounds.py --sft outputs/full/<time>/sft/model --threads 2 --train-seeds 1337 1
    python bench/online_rounds.py --sft SFT --only online --online curriculum.policy=ppo curriculum.rounds=4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from neuraflux.feedback.measure import held_out_prompts, measure_policy  # noqa: E402
from neuraflux.model.io import load_pretrained  # noqa: E402
from neuraflux.world import WorldConfig, generate_world  # noqa: E402

CHAINS = {
    "offline": ["curriculum=full", "curriculum.start_at=reward"],
    "online": ["curriculum=online", "curriculum.stages=[]"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_chain(chain: str, out: Path, args, seed: int) -> dict:
    overrides = [*CHAINS[chain], f"curriculum.init_from={args.sft}", f"held_out_fraction={args.held_out_fraction}",
                 f"seed={seed}", f"threads={args.threads}", f"paths.output_dir={out}",
                 *(args.online if chain == "online" else [])]  # fmt: skip
    log = out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{chain} seed {seed}] python train.py {' '.join(overrides)}", flush=True)
    start, cpu = time.perf_counter(), _children_cpu()
    with log.open("w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{chain} seed {seed} failed (exit {done.returncode}); see {log}")
    report = json.loads(next(out.glob("*/*/report.json")).read_text())
    measured = [row for row in report["stages"] if row["measure"]]
    final = measured[-1]["measure"]
    training = sum(row["wall_s"] or 0.0 for row in report["stages"])
    return {
        "process_wall_s": round(time.perf_counter() - start, 1),
        "process_cpu_s": round(_children_cpu() - cpu, 1),
        "training_s": round(training, 1),
        "total_wall_s": report["total_wall_s"],
        "final": {"stage": measured[-1]["stage"], "judges": final["judges"], "kl_to_sft": final["kl_to_sft"]},
        "rows": [
            {
                "stage": r["stage"],
                "judges_mean": (r["measure"] or {}).get("judges", {}).get("mean"),
                "kl_to_sft": (r["measure"] or {}).get("kl_to_sft"),
                "wall_s": r["wall_s"],
            }
            for r in report["stages"]
        ],  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, required=True, help="the SFT model both chains start from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--held-out-fraction", type=float, default=0.1, help="the run's held_out_fraction (both chains)")
    p.add_argument("--only", choices=sorted(CHAINS), default=None, help="run one chain only")
    p.add_argument("--online", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the online chain")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/bench/online/<time>")
    args = p.parse_args()
    out = args.out or ROOT / "outputs" / "bench" / "online" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    print(describe(args.threads), flush=True)

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.sft)
    results: dict = {"sft": {}, "runs": {}}
    chains = [args.only] if args.only else list(CHAINS)
    for i, seed in enumerate(args.train_seeds):
        world = generate_world(WorldConfig())
        prompts = held_out_prompts(world, val_fraction=args.held_out_fraction, seed=seed)
        sft = measure_policy(model, tokenizer, world, prompts=prompts, max_new_tokens=32, seed=seed)
        results["sft"][seed] = {"judges": sft.judges, "n": sft.n}
        for chain in chains if i % 2 == 0 else chains[::-1]:
            results["runs"][f"{chain}/{seed}"] = run_chain(chain, out / f"{chain}_s{seed}", args, seed)
            (out / "online_rounds.json").write_text(json.dumps(results, indent=2) + "\n")

    print("\n| chain | seed | held-out prompts | SFT mean | final mean | gap closed | KL to SFT | training s | total s "
          "| process CPU s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, run in results["runs"].items():
        chain, seed = key.split("/")
        base = results["sft"][int(seed)]
        sft_mean, final_mean = base["judges"]["mean"], run["final"]["judges"]["mean"]
        closed = (final_mean - sft_mean) / (1.0 - sft_mean) if sft_mean < 1.0 else float("nan")
        print(f"| {chain} | {seed} | {base['n']} | {sft_mean:.3f} | {final_mean:.3f} | {closed:.2f} | "
              f"{run['final']['kl_to_sft']:.2f} | {run['training_s']:.0f} | {run['total_wall_s']:.0f} | "
              f"{run['process_cpu_s']:.0f} |")  # fmt: skip
    print(
        f"\nwritten: {out / 'online_rounds.json'} (per-round rows under runs.*.rows); OMP threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


if __name__ == "__main__":
    main()
