"""The model's CPU dropout (model/dropout.py: bit masks, attention written out) against torch's own (F.dropout and
scaled_dot_product_attention's dropout): the same model, seed and batches, trained both ways at the `nano` shape on
character Shakespeare (6 x 384, block 256, batch 8, dropout 0.2, nanoGPT's optimizer settings); the validation loss
each reaches, and its tokens/s. Seeds alternate the two, so both see the same machine load.

    python bench/dropout_quality.py --steps 250 --seeds 2 --precision bf16-mixed --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe  # noqa: E402
from train_throughput import train_step, windows  # noqa: E402

import neuraflux.model.dropout as bit_dropout  # noqa: E402
import neuraflux.model.nano as nano  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.optim import OptimizerFactory  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402


def _torch_attention(q, k, v, mask, p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)


def _torch_dropout(x, p, training=True):
    return F.dropout(x, p, training=training)


@contextmanager
def torch_dropout():
    """The model with torch's dropout and fused-kernel attention dropout, as before model/dropout.py."""
    saved = bit_dropout.dropout, nano.attention_with_dropout
    bit_dropout.dropout, nano.attention_with_dropout = _torch_dropout, _torch_attention
    try:
        yield
    finally:
        bit_dropout.dropout, nano.attention_with_dropout = saved


def run(tokens: torch.Tensor, split: int, seed: int, steps: int, precision: str, eval_batches: int):
    """(validation loss, tokens/s) after `steps` steps from seed `seed`."""
    B, T = 8, 256
    cfg = NanoConfig(
        vocab_size=80, bias=False, block_size=T, max_position_embeddings=T, n_layer=6, n_head=6, n_embd=384,
        dropout=0.2, position_encoding="learned",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = NanoLM(cfg).train()
    opt, sched = OptimizerFactory(lr=1e-3, betas=(0.9, 0.99), warmup_steps=100, min_lr_ratio=0.1)(
        model.named_parameters(), total_steps=steps
    )
    batches = torch.Generator().manual_seed(seed)  # the same windows for both implementations
    bf16 = precision.startswith("bf16")
    start = None
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        train_step(model, opt, *windows(tokens, torch.randint(split - T - 1, (B,), generator=batches), T), bf16)
        sched.step()
    rate = (steps - 1) * B * T / (time.perf_counter() - start)
    model.eval()
    val = torch.Generator().manual_seed(0)  # the same validation windows for every run
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(eval_batches):
            x, y = windows(tokens, split + torch.randint(len(tokens) - split - T - 1, (B,), generator=val), T)
            losses.append(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item())
    return statistics.mean(losses), rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(args.threads))
    text = args.data.read_text()
    tokens = torch.tensor(NanoTokenizer.train([text], 0, mode="char").encode(text), dtype=torch.long)
    split = int(len(tokens) * 0.9)
    print(f"steps={args.steps} precision={args.precision} val batches={args.eval_batches} (8 x 256 tokens)")
    print("| seed | dropout | val loss | tokens/s |\n|---|---|---|---|")
    results = {"torch": [], "bit masks": []}
    for seed in range(args.seeds):
        for name in ("torch", "bit masks") if seed % 2 == 0 else ("bit masks", "torch"):
            if name == "torch":
                with torch_dropout():
                    loss, rate = run(tokens, split, seed, args.steps, args.precision, args.eval_batches)
            else:
                loss, rate = run(tokens, split, seed, args.steps, args.precision, args.eval_batches)
            results[name].append((loss, rate))
            print(f"| {seed} | {name} | {loss:.4f} | {rate:.0f} |", flush=True)
    for name, rows in results.items():
        print(
            f"{name}: mean val loss {statistics.mean(r[0] for r in rows):.4f}, "
            f"median tokens/s {statistics.median(r[1] for r in rows):.0f}"
        )


if __name__ == "__main__":
    main()
