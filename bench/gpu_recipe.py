"""nanoGPT's shakespeare-char recipe on one CUDA GPU: NeuraFlux (`python train.py experiment=char_nano trainer=gpu`)
beside nanoGPT's own loop (train_throughput.ReferenceLoop, the recipe in GPU_RECIPE) on the same GPU, bf16 autocast,
with and without torch.compile: validation loss against the published 1.4697, tokens/s and MFU.

    python bench/gpu_recipe.py --part throughput   # 4 clocked runs (ours and nanoGPT's, eager and compiled): ~5 min
    python bench/gpu_recipe.py --part ours         # our full 5000-step run, compiled: val loss, tokens/s, MFU
    python bench/gpu_recipe.py --part reference    # nanoGPT's full run, compiled
    python bench/gpu_recipe.py                     # all three, one after the other
    python bench/gpu_recipe.py --smoke             # the same code path on the CPU at tiny sizes (tests/)

Each run is a fresh process. Throughput: the slope of wall time between iterations 100 and 400 (after compilation
and warm-up, before any evaluation), as tokens/s = batch x block / seconds per iteration, and MFU = that times the
model's FLOPs per token (6N + 12·L·T·C, nanoGPT's estimate_mfu) over `--peak-flops`. Loss: ours is the exact loss
over every 256-token block of the val split at each validation (every 250 steps), nanoGPT's the mean of 200 random
val batches at each evaluation (its published figure's kind) and, at the end, the exact loss as ours.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import GPU_RECIPE, Recipe, ReferenceLoop, clocked, run_checked  # noqa: E402

from neuraflux.model import NanoConfig, NanoLM  # noqa: E402

PUBLISHED_VAL_LOSS = 1.4697  # nanoGPT's README, shakespeare-char on one A100
CLOCK = (100, 400)
# dense bf16 peak FLOPs/s of one device, by a substring of torch.cuda.get_device_name(); --peak-flops overrides
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
# --smoke: the same runs at sizes a CPU test finishes in seconds
SMOKE_RECIPE = Recipe(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=32,
    batch_size=4,
    dropout=0.2,
    iters=12,
    eval_iters=2,
    eval_interval=6,
    warmup=2,
)
SMOKE_CLOCK = (4, 8)


def our_overrides(recipe: Recipe, smoke: bool) -> list[str]:
    """What `experiment=char_nano trainer=gpu` needs on top to run `recipe` (nothing at the GPU recipe)."""
    if not smoke:
        return []
    return [
        "trainer.accelerator=cpu",
        f"model.n_layer={recipe.n_layer}",
        f"model.n_head={recipe.n_head}",
        f"model.n_embd={recipe.n_embd}",
        f"model.block_size={recipe.block_size}",
        f"model.max_position_embeddings={recipe.block_size}",
        f"data.batch_size={recipe.batch_size}",
        f"optim.warmup_steps={recipe.warmup}",
        "callbacks.compile.backend=eager",  # the capture without code generation: no compiler needed
    ]


def our_command(args, out: Path, steps: int, compile: bool, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=char_nano",
        "trainer=gpu",
        f"data.path={args.data}",
        f"model.position_encoding={args.position_encoding}",
        f"seed={args.seed}",
        f"trainer.max_steps={steps}",
        f"callbacks.compile.enabled={str(compile).lower()}",
        "logger=csv",
        f"paths.output_dir={out}",
        f"paths.run_dir={out}/run",
        *our_overrides(args.recipe, args.smoke),
        *extra,
    ]


def flops_per_token(args, ours: bool) -> int:
    """The model's training FLOPs per token at the recipe's block, counted on the model itself (ours has 80 token
    rows, nanoGPT's 65; the count leaves out position embeddings either way)."""
    r = args.recipe
    if ours:
        config = NanoConfig(
            vocab_size=80,
            bias=False,
            block_size=r.block_size,
            max_position_embeddings=r.block_size,
            n_layer=r.n_layer,
            n_head=r.n_head,
            n_embd=r.n_embd,
            position_encoding=args.position_encoding,
        )
        return NanoLM(config).flops_per_token(r.block_size)
    return ReferenceLoop(args.data, r, seed=0).model.flops_per_token(r.block_size)


def speed(args, seconds_per_iteration: float, ours: bool) -> dict:
    tokens_per_sec = args.recipe.batch_size * args.recipe.block_size / seconds_per_iteration
    mfu = tokens_per_sec * flops_per_token(args, ours) / args.peak_flops if args.peak_flops else None
    return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}


def show(name: str, row: dict) -> None:
    parts = [f"{name:34s}"]
    if "tokens_per_sec" in row:
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "n/a (no --peak-flops)"
        parts.append(f"{row['tokens_per_sec']:>10,.0f} tokens/s  MFU {mfu}")
    for key in ("val_loss_final", "val_loss_best", "val_estimate_final", "val_estimate_best", "val_exact"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    if "val_loss_best" in row or "val_estimate_best" in row:
        best = row.get("val_estimate_best", row.get("val_loss_best"))
        parts.append(f"(published {PUBLISHED_VAL_LOSS}: {'met' if best <= PUBLISHED_VAL_LOSS else 'not met'})")
    print("  ".join(parts), flush=True)


def throughput(args) -> dict:
    """Ours and nanoGPT's, eager and compiled, each a fresh process clocked over args.clock."""
    results = {}
    steps = args.clock[-1]
    for compile in (False, True):
        label = "compiled" if compile else "eager"
        with tempfile.TemporaryDirectory() as d:
            clock = Path(d) / "clock.json"
            ours = clocked(
                our_command(
                    args,
                    Path(d),
                    steps,
                    compile,
                    [
                        f"trainer.val_check_interval={steps}",  # its one validation comes after the clock stops
                        "trainer.limit_val_batches=1",
                        "+callbacks.step_clock._target_=step_clock.StepClock",
                        f"+callbacks.step_clock.path={clock}",
                        f"+callbacks.step_clock.steps={list(args.clock)}",
                    ],
                ),
                clock,
                args.clock,
            )
            results[f"ours, {label}"] = speed(args, ours[0], ours=True)
            show(f"NeuraFlux, bf16, {label}", results[f"ours, {label}"])
            clock.unlink()
            ref = clocked(
                [
                    sys.executable,
                    "bench/gpu_recipe.py",
                    "--reference-clock",
                    str(clock),
                    f"--data={args.data}",
                    *(["--compile"] if compile else []),
                    *(["--smoke"] if args.smoke else []),
                ],
                clock,
                args.clock,
            )
            results[f"nanoGPT, {label}"] = speed(args, ref[0], ours=False)
            show(f"nanoGPT loop, bf16, {label}", results[f"nanoGPT, {label}"])
        ratio = results[f"ours, {label}"]["tokens_per_sec"] / results[f"nanoGPT, {label}"]["tokens_per_sec"]
        print(f"  ours / nanoGPT tokens/s, {label}: {ratio:.3f}", flush=True)
    return results


def our_full_run(args) -> dict:
    """`experiment=char_nano trainer=gpu`, the whole recipe: its val/loss at every validation (the CSV log)."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cmd = our_command(args, Path(d), args.recipe.iters, args.compile_full, [])
        if args.smoke:
            cmd.append(f"trainer.val_check_interval={args.recipe.eval_interval}")
        run_checked(cmd)
        run = Path(d) / "run"
        metrics = json.loads((run / "metrics.json").read_text())
        with open(run / "csv" / "metrics.csv") as f:
            vals = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
        row = speed(args, args.recipe.batch_size * args.recipe.block_size / metrics["train/tokens_per_sec_mean"], True)
        row.update(val_loss_final=vals[-1], val_loss_best=min(vals), validations=len(vals))
        row["wall_s"] = time.perf_counter() - t0
    show(f"NeuraFlux full run, {'compiled' if args.compile_full else 'eager'}", row)
    return row


def reference_full_run(args) -> dict:
    """nanoGPT's whole recipe in its own loop: its estimates at every evaluation, then the exact val loss."""
    loop = ReferenceLoop(args.data, args.recipe, args.seed, args.device, torch.bfloat16, args.compile_full)
    t0 = time.perf_counter()
    for it, _ in loop.run():
        if it == 1:  # as our ThroughputMonitor: the first iteration (compilation, warm-up) is not counted
            start, eval_before = time.perf_counter(), loop.eval_seconds
    if args.device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start - (loop.eval_seconds - eval_before)
    row = speed(args, train_s / (args.recipe.iters - 1), ours=False)
    row.update(
        val_estimate_final=loop.estimates[-1],
        val_estimate_best=min(loop.estimates),
        val_exact=loop.exact_val_loss(),
        wall_s=time.perf_counter() - t0,
    )
    show(f"nanoGPT full run, {'compiled' if args.compile_full else 'eager'}", row)
    return row


def reference_clock(args, out: Path) -> None:
    """One clocked run of nanoGPT's loop (no evaluation) for args.clock[-1] iterations, in bf16 autocast."""
    recipe = replace(args.recipe, iters=args.clock[-1])
    loop = ReferenceLoop(args.data, recipe, args.seed, args.device, torch.bfloat16, args.compile)
    wall, cpu = {}, {}
    for it, _ in loop.run(evaluate=False):
        if it in args.clock and it not in wall:
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall[it], cpu[it] = time.perf_counter(), time.process_time()
    out.write_text(json.dumps({"wall": wall, "cpu": cpu}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--part", default="throughput,ours,reference", help="comma-separated: throughput, ours, reference")
    p.add_argument(
        "--position-encoding", choices=["learned", "rope"], default="learned", help="ours (nanoGPT's: learned)"
    )
    p.add_argument("--no-compile-full", dest="compile_full", action="store_false", help="full runs eager")
    p.add_argument("--peak-flops", type=float, help="the GPU's dense bf16 peak FLOPs/s (default: by device name)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the plumbing, no figure means anything")
    p.add_argument("--reference-clock", type=Path, help=argparse.SUPPRESS)  # one clocked nanoGPT run (subprocess)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.recipe, args.clock = (SMOKE_RECIPE, SMOKE_CLOCK) if args.smoke else (GPU_RECIPE, CLOCK)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "bench/gpu_recipe.py needs a CUDA GPU (torch.cuda.is_available() is False here, torch "
            f"{torch.__version__}); `--smoke` runs the same steps on the CPU at tiny sizes"
        )
    args.device = "cpu" if args.smoke else "cuda"
    if args.reference_clock:
        reference_clock(args, args.reference_clock)
        return
    if args.device == "cuda" and args.peak_flops is None:
        name = torch.cuda.get_device_name()
        args.peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        print(
            f"device: {name}, peak bf16 {args.peak_flops or 'unknown (pass --peak-flops)'} FLOPs/s, "
            f"torch {torch.__version__}"
        )
    parts = [s.strip() for s in args.part.split(",") if s.strip()]
    unknown = set(parts) - {"throughput", "ours", "reference"}
    if unknown:
        p.error(f"--part: unknown {sorted(unknown)}; choose from throughput, ours, reference")
    print(f"recipe: {asdict(args.recipe)}; ours with model.position_encoding={args.position_encoding}", flush=True)
    results = {"recipe": asdict(args.recipe), "published_val_loss": PUBLISHED_VAL_LOSS, "peak_flops": args.peak_flops}
    if "throughput" in parts:
        results["throughput"] = throughput(args)
    if "ours" in parts:
        results["ours"] = our_full_run(args)
    if "reference" in parts:
        results["reference"] = reference_full_run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
