"""Training throughput: the framework (`python train.py`) against a minimal plain-PyTorch loop on the same model.

Rounds alternate A (framework) and B (plain loop) so both see the same machine load; each reports tokens/s
after a warm-up step. Ratio = median framework / median plain. Optionally one full run for the final val loss.

    python bench/train_throughput.py --shape char --rounds 3 --steps 300 --threads 2
    python bench/train_throughput.py --shape nano --precision bf16-mixed --steps 40 --threads 2
    python bench/train_throughput.py --shape char --full-run   # 2000 iterations, prints val loss
    python bench/train_throughput.py --shape char --reference --threads 1   # nanoGPT's own run, re-implemented
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe, has_fast_bf16  # noqa: E402

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


def plain_loop(
    data: Path, shape: str, steps: int, precision: str, threads: int, position_encoding: str = "rope"
) -> float:
    """nanoGPT-style: random offsets, forward, loss, backward, clip, AdamW step. Returns tokens/s."""
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


class _RefGPT(nn.Module):
    """nanoGPT's model (bias=False) written independently, modules created in its order so that one seed gives
    the same initial weights: the reference for `--reference`, kept apart from NanoLM on purpose."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block: int):
        super().__init__()
        self.n_head = n_head
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))  # (B, T, C)
        C = x.shape[-1]
        for b in self.h:
            q, k, v = b.c_attn(b.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + b.attn_c_proj(y)
            x = x + b.mlp_c_proj(F.gelu(b.c_fc(b.ln_2(x))))
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def reference_run(data: Path, seed: int, iters: int = 2000, eval_iters: int = 20) -> dict:
    """nanoGPT's README CPU run (train_shakespeare_char.py + its CPU flags), RNG stream included, so seed 1337
    reproduces its logged figure. Returns its 20-batch val estimate and the exact val loss our runs report."""
    text = data.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    n = int(len(ids) * 0.9)
    splits = {"train": ids[:n], "val": ids[n:]}
    B, T, warmup, lr, min_lr = 12, 64, 100, 1e-3, 1e-4
    torch.manual_seed(seed)
    model = _RefGPT(len(chars), 4, 4, 128, T)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.99),
    )

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - T, (B,))
        return torch.stack([d[i : i + T] for i in ix]), torch.stack([d[i + 1 : i + 1 + T] for i in ix])

    def loss_of(x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def estimate() -> float:  # as nanoGPT: eval_iters random batches of each split, train's drawn first
        model.eval()
        out = {s: statistics.fmean(loss_of(*batch(s)).item() for _ in range(eval_iters)) for s in ("train", "val")}
        model.train()
        return out["val"]

    x, y = batch("train")
    for it in range(iters + 1):
        if it < warmup:
            rate = lr * (it + 1) / (warmup + 1)
        else:
            rate = min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (iters - warmup))) * (lr - min_lr)
        for g in opt.param_groups:
            g["lr"] = rate
        if it % 250 == 0:
            val_estimate = estimate()
        if it == iters:
            break  # nanoGPT steps once more after this evaluation, which cannot change the figure it printed
        loss = loss_of(x, y)
        x, y = batch("train")  # fetched between forward and backward, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    val = splits["val"]
    blocks = (len(val) - 1) // T
    with torch.no_grad():  # every non-overlapping block, as LMDataModule's val split
        x = val[: blocks * T].view(blocks, T)
        y = val[1 : blocks * T + 1].view(blocks, T)
        total = sum(
            F.cross_entropy(model(x[i : i + 256]).flatten(0, 1), y[i : i + 256].flatten(), reduction="sum").item()
            for i in range(0, blocks, 256)
        )
    exact = total / (blocks * T)
    return {"val_estimate": val_estimate, "val_exact": exact}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--shape", choices=sorted(SHAPES), default="char")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-run", action="store_true", help="one 2000-iteration framework run; report val loss")
    p.add_argument(
        "--reference",
        action="store_true",
        help="nanoGPT's 2000-iteration CPU run, re-implemented; its 20-batch val estimate and exact val loss",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the full or reference run")
    p.add_argument(
        "--position-encoding",
        choices=["learned", "rope"],
        default="rope",
        help="model.position_encoding of the framework runs and the plain loop (rope: the experiments' "
        "default; learned: nanoGPT's)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(args.threads))
    if args.precision.startswith("bf16") and not has_fast_bf16():
        print(
            "this CPU has neither AMX nor AVX512-BF16: bfloat16 matmuls are emulated and slower than float32 here, "
            "so train with trainer.precision=32-true on it; the figures below measure the emulation, not bf16"
        )
    print(
        f"shape={args.shape} precision={args.precision} threads={args.threads} steps/round={args.steps} "
        f"position_encoding={args.position_encoding}"
    )
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
                args.precision,
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
    fw, plain = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            fw.append(
                framework_run(
                    args.data,
                    args.shape,
                    args.steps,
                    args.precision,
                    args.threads,
                    Path(d),
                    extra=[f"model.position_encoding={args.position_encoding}"],
                )["train/tokens_per_sec_mean"]
            )
        plain.append(
            plain_loop(args.data, args.shape, args.steps, args.precision, args.threads, args.position_encoding)
        )
        print(
            f"round {r}: framework {fw[-1]:.0f} tokens/s, plain loop {plain[-1]:.0f} tokens/s, "
            f"ratio {fw[-1] / plain[-1]:.3f}"
        )
    # each round's pair ran back to back under the same load: the median of per-round ratios is the figure
    ratio = statistics.median(a / b for a, b in zip(fw, plain))
    print(
        f"median: framework {statistics.median(fw):.0f} tokens/s, plain {statistics.median(plain):.0f} tokens/s, "
        f"median per-round ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
