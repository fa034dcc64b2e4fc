"""Training throughput: the framework (`python train.py`) against a minimal plain-PyTorch loop on the same model.

Rounds alternate A (framework) and B (plain loop) so both see the same machine load; each reports tokens/s
after a warm-up step. Ratio = median framework / median plain. Optionally one full run for the final val loss.

    python bench/train_throughput.py --shape char --rounds 3 --steps 300 --threads 2
    python bench/train_throughput.py --shape nano --precision bf16-mixed --steps 40 --threads 2
    python bench/train_throughput.py --shape nano --precision 32-true bf16-mixed --steps 20 --threads 1  # bf16 / fp32
    python bench/train_throughput.py --shape nano --precision 32-true bf16-mixed --threads 1 --profile  # where it goes
    python bench/train_throughput.py --shape char --full-run   # 2000 iterations, prints val loss
    python bench/train_throughput.py --shape char --reference --threads 1   # nanoGPT's own run, re-implemented
    python bench/train_throughput.py --against-reference --rounds 5 --threads 1   # train.py's it/s / nanoGPT loop's
    python bench/train_throughput.py --against-reference --threads 1 callbacks.progress_bar.refresh_s=0  # + overrides
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from machine import bf16_worth_measuring, describe  # noqa: E402

from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.optim import OptimizerFactory  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

SHAPES = {
    "char": dict(experiment="char_cpu", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0),
    "nano": dict(experiment="char_nano", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, dropout=0.2),
}


def framework_run(data: Path, shape: str, steps: int, precision: str, threads: int, out: Path, extra=()) -> dict:
    cmd = [
        sys.executable,
        "train.py",
        f"experiment={SHAPES[shape]['experiment']}",
        f"data.path={data}",
        f"trainer.max_steps={steps}",
        f"trainer.precision={precision}",
        f"data.batch_size={SHAPES[shape]['batch_size']}",  # the plain loop's (char_nano's own is the GPU recipe's 64)
        f"threads={threads}",
        f"paths.output_dir={out}",
        f"paths.run_dir={out}",
        "~callbacks.progress_bar",
        "trainer.enable_model_summary=false",
        *extra,
    ]
    if steps < 2000 and "trainer.val_check_interval" not in " ".join(extra):
        cmd.append(f"trainer.val_check_interval={steps}")
        cmd.append("trainer.limit_val_batches=2")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads((out / "metrics.json").read_text())


def windows(tokens: torch.Tensor, starts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, T): the windows of `tokens` at `starts`, and the same shifted by one."""
    return torch.stack([tokens[i : i + T] for i in starts]), torch.stack([tokens[i + 1 : i + T + 1] for i in starts])


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> None:
    """nanoGPT's step: forward (under bf16 autocast or not), cross-entropy, backward, clip to 1.0, update."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_loop(
    data: Path,
    shape: str,
    steps: int,
    precision: str,
    threads: int,
    position_encoding: str = "rope",
    profile_steps: int = 0,
) -> float:
    """nanoGPT-style: random offsets, forward, loss, backward, clip, AdamW step. Returns tokens/s. With
    profile_steps, that many more steps run under torch.profiler and the top operators are printed."""
    torch.set_num_threads(threads)
    s = SHAPES[shape]
    text = data.read_text()
    tok = NanoTokenizer.train([text], 0, mode="char")
    tokens = torch.tensor(tok.encode(text), dtype=torch.long)
    train = tokens[: int(len(tokens) * 0.9)]
    cfg = NanoConfig(
        vocab_size=80,
        bias=False,
        block_size=s["block_size"],
        max_position_embeddings=s["block_size"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        n_embd=s["n_embd"],
        dropout=s["dropout"],
        position_encoding=position_encoding,
    )
    torch.manual_seed(0)
    model = NanoLM(cfg).train()
    opt, _ = OptimizerFactory(lr=1e-3, betas=(0.9, 0.99))(model.named_parameters(), total_steps=steps)
    B, T = s["batch_size"], s["block_size"]
    bf16 = precision.startswith("bf16")

    def step() -> None:
        train_step(model, opt, *windows(train, torch.randint(len(train) - T - 1, (B,)), T), bf16)

    step()  # step 0 warms up allocators and kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * B * T / (time.perf_counter() - start)
    if profile_steps:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(profile_steps):
                step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{precision}: {total / profile_steps / 1e3:.0f} ms a step (profiled), top operators by self CPU time:")
        for e in events[:14]:
            ms = e.self_cpu_time_total / profile_steps / 1e3
            print(f"  {e.key:<32} {ms:7.1f} ms a step  {100 * e.self_cpu_time_total / total:4.1f} %")
    return rate


class _RefGPT(nn.Module):
    """nanoGPT's model (bias=False) written independently, modules created in its order so that one seed gives
    the same initial weights: the reference for `--reference`, kept apart from NanoLM on purpose. Dropout sits where
    nanoGPT's does (embeddings, attention weights, both residual branches) and draws nothing at 0."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln_1=nn.LayerNorm(n_embd, bias=False),
                    c_attn=nn.Linear(n_embd, 3 * n_embd, bias=False),
                    attn_c_proj=nn.Linear(n_embd, n_embd, bias=False),
                    ln_2=nn.LayerNorm(n_embd, bias=False),
                    c_fc=nn.Linear(n_embd, 4 * n_embd, bias=False),
                    mlp_c_proj=nn.Linear(4 * n_embd, n_embd, bias=False),
                )
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():  # nanoGPT's apply() order: the tied matrix ends with the head's draw
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self._drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        C = x.shape[-1]
        p = self.dropout if self.training else 0.0
        for b in self.h:
            q, k, v = b.c_attn(b.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self._drop(b.attn_c_proj(y))
            x = x + self._drop(b.mlp_c_proj(F.gelu(b.c_fc(b.ln_2(x)))))
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def flops_per_token(self, T: int) -> int:
        """nanoGPT's estimate_mfu count: 6N (N without position embeddings) + 12 L T C."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * len(self.h) * T * self.wte.weight.shape[1]


@dataclass(frozen=True)
class Recipe:
    """nanoGPT's shakespeare-char hyperparameters (config/train_shakespeare_char.py); the defaults are its README's
    CPU run (`--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20`), GPU_RECIPE the config as published."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    dropout: float = 0.0
    iters: int = 2000
    eval_iters: int = 20
    eval_interval: int = 250
    log_interval: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100


CPU_RECIPE = Recipe()
GPU_RECIPE = Recipe(
    n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, iters=5000, eval_iters=200
)


class ReferenceLoop:
    """nanoGPT's train.py loop over a `Recipe`, RNG stream included: the model is built right after
    `torch.manual_seed(seed)`, batches are drawn with torch.randint on the CPU, the next batch is fetched between
    forward and backward, AdamW is the fused kernel on CUDA and the per-tensor loop on CPU (nanoGPT's choice), and
    on a GPU forward and loss run under `autocast(dtype)`, compiled with `compile`. `run()` yields after every
    iteration so that a caller can clock it."""

    def __init__(self, data: Path, recipe: Recipe, seed: int, device: str = "cpu", dtype=None, compile: bool = False):
        text = data.read_text()
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([stoi[c] for c in text])
        n = int(len(ids) * 0.9)
        self.splits = {"train": ids[:n], "val": ids[n:]}
        self.recipe, self.device = recipe, torch.device(device)
        torch.manual_seed(seed)
        r = recipe
        self.model = _RefGPT(len(chars), r.n_layer, r.n_head, r.n_embd, r.block_size, r.dropout).to(self.device)
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=r.lr,
            betas=(0.9, 0.99),
            **({"fused": True} if self.device.type == "cuda" else {}),
        )
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        self.loss_of = torch.compile(self._loss) if compile else self._loss  # nanoGPT compiles model and loss
        self.estimates: list[float] = []
        self.eval_seconds = 0.0

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

    def batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d, T = self.splits[split], self.recipe.block_size
        ix = torch.randint(len(d) - T, (self.recipe.batch_size,))
        x = torch.stack([d[i : i + T] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + T] for i in ix])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def lr_at(self, it: int) -> float:
        r = self.recipe
        if it < r.warmup:
            return r.lr * (it + 1) / (r.warmup + 1)
        return r.min_lr + 0.5 * (1 + math.cos(math.pi * (it - r.warmup) / (r.iters - r.warmup))) * (r.lr - r.min_lr)

    @torch.no_grad()
    def estimate(self) -> float:
        """As nanoGPT: eval_iters random batches of each split, train's drawn first; returns val's mean, also
        appended to `estimates`, its time to `eval_seconds`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what training queued is not evaluation time
        start = time.perf_counter()
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            with self.autocast:
                losses = [self.loss_of(*self.batch(split)).item() for _ in range(self.recipe.eval_iters)]
            out[split] = statistics.fmean(losses)
        self.model.train()
        self.estimates.append(out["val"])
        self.eval_seconds += time.perf_counter() - start
        return out["val"]

    def run(self, evaluate: bool = True):
        """Train for recipe.iters iterations, yielding (iteration done, last val estimate) after each; with
        `evaluate`, every eval_interval as nanoGPT (its figure after the last iteration included)."""
        r = self.recipe
        val_estimate = None
        x, y = self.batch("train")
        for it in range(r.iters + 1):
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_at(it)
            if evaluate and it % r.eval_interval == 0:
                val_estimate = self.estimate()
            if it == r.iters:
                break  # nanoGPT steps once more after this evaluation, which cannot change the figure it printed
            with self.autocast:
                loss = self.loss_of(x, y)
            x, y = self.batch("train")  # fetched between forward and backward, as nanoGPT does
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if it % r.log_interval == 0:
                loss.item()  # nanoGPT's logging reads the loss (a device sync on a GPU)
            yield it + 1, val_estimate
        yield r.iters, val_estimate

    @torch.no_grad()
    def exact_val_loss(self) -> float:
        """The loss over every non-overlapping block of the val split, as LMDataModule's val split and our runs'
        val/loss."""
        self.model.eval()
        val, T = self.splits["val"], self.recipe.block_size
        blocks = (len(val) - 1) // T
        x = val[: blocks * T].view(blocks, T)
        y = val[1 : blocks * T + 1].view(blocks, T)
        total = 0.0
        for i in range(0, blocks, 256):
            xi, yi = x[i : i + 256].to(self.device), y[i : i + 256].to(self.device)
            with self.autocast:
                logits = self.model(xi)
            total += F.cross_entropy(logits.flatten(0, 1).float(), yi.flatten(), reduction="sum").item()
        self.model.train()
        return total / (blocks * T)


def reference_run(data: Path, seed: int) -> dict:
    """nanoGPT's README CPU run (train_shakespeare_char.py + its CPU flags), RNG stream included, so seed 1337
    reproduces its logged figure. Returns its 20-batch val estimate and the exact val loss our runs report."""
    loop = ReferenceLoop(data, CPU_RECIPE, seed)
    *_, (_, val_estimate) = loop.run()  # its last item comes after the final evaluation
    return {"val_estimate": val_estimate, "val_exact": loop.exact_val_loss()}


CLOCK_STEPS = (100, 400)  # the steady-state window: after warm-up, before either side's first evaluation


def reference_clock(data: Path, threads: int, out: Path) -> None:
    """One clocked run of nanoGPT's CPU loop (evaluation left out: ours first validates at 500) for
    CLOCK_STEPS[-1] iterations; writes what StepClock writes for a framework run."""
    torch.set_num_threads(threads)
    loop = ReferenceLoop(data, replace(CPU_RECIPE, iters=CLOCK_STEPS[-1]), seed=1337)
    wall, cpu = {}, {}
    for it, _ in loop.run(evaluate=False):
        if it in CLOCK_STEPS and it not in wall:
            wall[it], cpu[it] = time.perf_counter(), time.process_time()
    out.write_text(json.dumps({"wall": wall, "cpu": cpu}))


def run_checked(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository root with src/ and bench/ importable (StepClock is bench/step_clock.py);
    RuntimeError with the end of its stderr when it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return proc


def clocked(cmd: list[str], out: Path, steps: tuple[int, int] = CLOCK_STEPS) -> tuple[float, float]:
    """Run `cmd` (which writes a StepClock file at `out`); seconds per iteration between `steps`, wall and CPU."""
    run_checked(cmd)
    t = json.loads(out.read_text())
    a, b = (str(s) for s in steps)
    n = steps[1] - steps[0]
    return (t["wall"][b] - t["wall"][a]) / n, (t["cpu"][b] - t["cpu"][a]) / n


def against_reference(data: Path, rounds: int, threads: int, extra: list[str]) -> None:
    """Rounds alternate `python train.py experiment=char_cpu model.position_encoding=learned` (every default
    callback, logger and checkpoint of that command) and nanoGPT's loop, each a fresh process; each reports the
    slope of wall time (and of CPU time) over CLOCK_STEPS. Ratio = reference seconds per iteration / ours, i.e.
    our iterations/s over nanoGPT's."""
    rows = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            clock = Path(d) / "clock.json"
            ours = clocked(
                [
                    sys.executable,
                    "train.py",
                    "experiment=char_cpu",
                    f"data.path={data}",
                    "model.position_encoding=learned",
                    f"threads={threads}",
                    f"trainer.max_steps={CLOCK_STEPS[-1]}",
                    f"paths.output_dir={d}",
                    f"paths.run_dir={d}/run",
                    "+callbacks.step_clock._target_=step_clock.StepClock",
                    f"+callbacks.step_clock.path={clock}",
                    f"+callbacks.step_clock.steps={list(CLOCK_STEPS)}",
                    *extra,
                ],
                clock,
            )
            clock.unlink()
            ref = clocked(
                [
                    sys.executable,
                    "bench/train_throughput.py",
                    "--reference-clock",
                    str(clock),
                    f"--data={data}",
                    f"--threads={threads}",
                ],
                clock,
            )
        rows.append((ours, ref))
        print(
            f"round {r}: ours {1 / ours[0]:.2f} it/s, nanoGPT {1 / ref[0]:.2f} it/s, ratio {ref[0] / ours[0]:.3f} "
            f"(CPU time: ours {ours[1] * 1e3:.1f} ms/it, nanoGPT {ref[1] * 1e3:.1f}, ratio {ref[1] / ours[1]:.3f})",
            flush=True,
        )
    wall = statistics.median(ref[0] / ours[0] for ours, ref in rows)
    cpu = statistics.median(ref[1] / ours[1] for ours, ref in rows)
    print(f"median per-round ratio, ours / nanoGPT iterations/s: wall {wall:.3f}, CPU time {cpu:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--shape", choices=sorted(SHAPES), default="char")
    p.add_argument(
        "--precision",
        nargs="+",
        default=["32-true"],
        help="trainer.precision; several: each round runs each in turn, and the medians are compared to the first",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-run", action="store_true", help="one 2000-iteration framework run; report val loss")
    p.add_argument(
        "--reference",
        action="store_true",
        help="nanoGPT's 2000-iteration CPU run, re-implemented; its 20-batch val estimate and exact val loss",
    )
    p.add_argument(
        "--against-reference",
        action="store_true",
        help="iterations/s of `python train.py experiment=char_cpu model.position_encoding=learned` against nanoGPT's "
        "own loop at its CPU recipe, slope of wall time between iterations 100 and 400, rounds alternating",
    )
    p.add_argument("--reference-clock", type=Path, help=argparse.SUPPRESS)  # one clocked reference run (a subprocess)
    p.add_argument("--seed", type=int, default=1337, help="seed of the full or reference run")
    p.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="measure bf16 precisions on a CPU without AMX or AVX512-BF16 too (skipped there by default)",
    )
    p.add_argument(
        "--profile", action="store_true", help="only: where a plain-loop step goes, per --precision (3 steps profiled)"
    )
    p.add_argument(
        "--position-encoding",
        choices=["learned", "rope"],
        default="rope",
        help="model.position_encoding of the framework runs and the plain loop (rope: the experiments' "
        "default; learned: nanoGPT's)",
    )
    args, extra = p.parse_known_args()
    if extra and not args.against_reference:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.reference_clock:
        reference_clock(args.data, args.threads, args.reference_clock)
        return
    torch.set_num_threads(args.threads)
    print(describe(args.threads))
    if args.against_reference:
        print(f"threads={args.threads}, train.py overrides: {' '.join(extra) or 'none'}")
        against_reference(args.data, args.rounds, args.threads, extra)
        return
    args.precision, advice = bf16_worth_measuring(args.precision, args.emulated_bf16)
    if advice:
        print(advice)
    if not args.precision:
        return
    print(
        f"shape={args.shape} precision={' '.join(args.precision)} threads={args.threads} steps/round={args.steps} "
        f"position_encoding={args.position_encoding}"
    )
    if args.profile:
        for precision in args.precision:
            plain_loop(args.data, args.shape, 2, precision, args.threads, args.position_encoding, profile_steps=3)
        return
    if args.reference:
        t0 = time.perf_counter()
        r = reference_run(args.data, args.seed)
        print(
            f"reference run (seed {args.seed}): 20-batch val estimate {r['val_estimate']:.4f}, "
            f"exact val/loss {r['val_exact']:.4f}, {time.perf_counter() - t0:.0f} s"
        )
        return
    if args.full_run:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            m = framework_run(
                args.data,
                args.shape,
                2000,
                args.precision[0],
                args.threads,
                Path(d),
                extra=[
                    "trainer.val_check_interval=500",
                    f"seed={args.seed}",
                    f"model.position_encoding={args.position_encoding}",
                ],
            )
            print(
                f"full run (seed {args.seed}): {m['global_step']} steps in {time.perf_counter() - t0:.0f} s, "
                f"val/loss {m['val/loss']:.4f}, {m['train/tokens_per_sec_mean']:.0f} tokens/s"
            )
        return
    fw = {p: [] for p in args.precision}
    plain = {p: [] for p in args.precision}
    for r in range(args.rounds):
        for precision in args.precision:  # in turn within a round, so each precision sees the same load
            with tempfile.TemporaryDirectory() as d:
                fw[precision].append(
                    framework_run(
                        args.data,
                        args.shape,
                        args.steps,
                        precision,
                        args.threads,
                        Path(d),
                        extra=[f"model.position_encoding={args.position_encoding}"],
                    )["train/tokens_per_sec_mean"]
                )
            plain[precision].append(
                plain_loop(args.data, args.shape, args.steps, precision, args.threads, args.position_encoding)
            )
            print(
                f"round {r} {precision}: framework {fw[precision][-1]:.0f} tokens/s, plain loop "
                f"{plain[precision][-1]:.0f} tokens/s, ratio {fw[precision][-1] / plain[precision][-1]:.3f}"
            )
    for precision in args.precision:
        # each round's pair ran back to back under the same load: the median of per-round ratios is the figure
        ratio = statistics.median(a / b for a, b in zip(fw[precision], plain[precision]))
        print(
            f"{precision} median: framework {statistics.median(fw[precision]):.0f} tokens/s, plain "
            f"{statistics.median(plain[precision]):.0f} tokens/s, median per-round ratio {ratio:.3f}"
        )
    base = args.precision[0]
    for precision in args.precision[1:]:
        print(
            f"{precision} / {base} tokens/s (median of per-round ratios): framework "
            f"{statistics.median(a / b for a, b in zip(fw[precision], fw[base])):.2f}x, plain loop "
            f"{statistics.median(a / b for a, b in zip(plain[precision], plain[base])):.2f}x"
        )


if __name__ == "__main__":
    main()
