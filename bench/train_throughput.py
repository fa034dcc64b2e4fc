"""Training throughput: the framework (`python train.py`) against a minimal plain-PyTorch loop on the same model.

Rounds alternate A (framework) and B (plain loop) so both see the same machine load; each reports tokens/s
after a warm-up step. Ratio = median framework / median plain. Optionally one full run for the final val loss.

    python bench/train_throughput.py --shape char --rounds 3 --steps 300 --threads 2
    python bench/train_throughput.py --shape nano --precision bf16-mixed --steps 40 --threads 2
    python bench/train_throughput.py --shape char --full-run   # 2000 iterations, prints val loss
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.optim import OptimizerFactory  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

SHAPES = {
    "char": dict(experiment="char_cpu", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0),
    "nano": dict(experiment="char_nano", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, dropout=0.2),
}


def framework_run(data: Path, shape: str, steps: int, precision: str, threads: int, out: Path, extra=()) -> dict:
    cmd = [
        sys.executable, "train.py", f"experiment={SHAPES[shape]['experiment']}", f"data.path={data}",
        f"trainer.max_steps={steps}", f"trainer.precision={precision}", f"threads={threads}",
        f"paths.output_dir={out}", f"paths.run_dir={out}", "~callbacks.progress_bar",
        "trainer.enable_model_summary=false", *extra,
    ]
    if steps < 2000 and "trainer.val_check_interval" not in " ".join(extra):
        cmd.append(f"trainer.val_check_interval={steps}")
        cmd.append("trainer.limit_val_batches=2")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads((out / "metrics.json").read_text())


def plain_loop(data: Path, shape: str, steps: int, precision: str, threads: int) -> float:
    """nanoGPT-style: random offsets, forward, loss, backward, clip, AdamW step. Returns tokens/s."""
    torch.set_num_threads(threads)
    s = SHAPES[shape]
    text = data.read_text()
    tok = NanoTokenizer.train([text], 0, mode="char")
    tokens = torch.tensor(tok.encode(text), dtype=torch.long)
    train = tokens[: int(len(tokens) * 0.9)]
    cfg = NanoConfig(vocab_size=80, bias=False, block_size=s["block_size"], max_position_embeddings=s["block_size"],
                     n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"])
    torch.manual_seed(0)
    model = NanoLM(cfg).train()
    opt, _ = OptimizerFactory(lr=1e-3, betas=(0.9, 0.99))(model.named_parameters(), total_steps=steps)
    B, T = s["batch_size"], s["block_size"]
    bf16 = precision.startswith("bf16")
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()  # step 0 warms up allocators and kernels
        ix = torch.randint(len(train) - T - 1, (B,))
        x = torch.stack([train[i : i + T] for i in ix])
        y = torch.stack([train[i + 1 : i + T + 1] for i in ix])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * B * T / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--shape", choices=sorted(SHAPES), default="char")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-run", action="store_true", help="one 2000-iteration framework run; report val loss")
    p.add_argument("--seed", type=int, default=1337, help="seed of the full run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"shape={args.shape} precision={args.precision} threads={args.threads} steps/round={args.steps}")
    if args.full_run:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            m = framework_run(args.data, args.shape, 2000, args.precision, args.threads, Path(d),
                              extra=["trainer.val_check_interval=500", f"seed={args.seed}"])
            print(f"full run (seed {args.seed}): {m['global_step']} steps in {time.perf_counter() - t0:.0f} s, "
                  f"val/loss {m['val/loss']:.4f}, {m['train_tokens_per_sec']:.0f} tokens/s")
        return
    fw, plain = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            fw.append(framework_run(args.data, args.shape, args.steps, args.precision, args.threads, Path(d))[
                "train_tokens_per_sec"])
        plain.append(plain_loop(args.data, args.shape, args.steps, args.precision, args.threads))
        print(f"round {r}: framework {fw[-1]:.0f} tokens/s, plain loop {plain[-1]:.0f} tokens/s, "
              f"ratio {fw[-1] / plain[-1]:.3f}")
    # each round's pair ran back to back under the same load: the median of per-round ratios is the figure
    ratio = statistics.median(a / b for a, b in zip(fw, plain))
    print(f"median: framework {statistics.median(fw):.0f} tokens/s, plain {statistics.median(plain):.0f} tokens/s, "
          f"median per-round ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
