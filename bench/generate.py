"""Greedy decoding speed of the `nano` shape against Hugging Face transformers' GPT-2 of the same shape.

Both with a KV cache, random weights (built offline, nothing downloaded), prompt 32 tokens, 256 new tokens, at
batch 1 and 8, with the weights in float32 and in bfloat16 (both models cast whole, `model.to(dtype)`). Rounds
alternate NeuraFlux and GPT-2 so both see the same machine load; medians are compared.
Needs the bench extra: pip install -e ".[bench]".

    python bench/generate.py --threads 1 --rounds 3 [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neuraflux.model import NanoConfig, NanoLM, generate  # noqa: E402

SHAPE = dict(vocab_size=10_000, n_layer=6, n_head=6, n_embd=384, max_position_embeddings=512)


def ours(batch: int, prompt: int, new: int, dtype: torch.dtype) -> float:
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(block_size=512, **SHAPE)).eval().to(dtype)
    ids = torch.randint(10, 10_000, (batch, prompt))
    generate(model, ids, 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, ids, new, temperature=0)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new)
    return batch * new / dt


def hf(batch: int, prompt: int, new: int, dtype: torch.dtype) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["max_position_embeddings"], n_embd=SHAPE["n_embd"],
        n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
    )
    model = GPT2LMHeadModel(cfg).eval().to(dtype)
    ids = torch.randint(10, 10_000, (batch, prompt))
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        dt = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new)
    return batch * new / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, prompt={args.prompt}, new={args.new}")
    print("| batch | weights | NeuraFlux tokens/s | GPT-2 (transformers) tokens/s | ratio | NeuraFlux vs GPT-2 float32 |")
    print("|---|---|---|---|---|---|")
    for b in args.batches:
        medians = {}
        for name in args.dtypes:
            dtype = getattr(torch, name)
            a, h = [], []
            for _ in range(args.rounds):
                a.append(ours(b, args.prompt, args.new, dtype))
                h.append(hf(b, args.prompt, args.new, dtype))
            medians[name] = statistics.median(a), statistics.median(h)
        base = medians.get("float32", (None, None))[1]
        for name, (ma, mh) in medians.items():
            vs = f"{ma / base:.2f}" if base else "–"
            print(f"| {b} | {name} | {ma:.0f} | {mh:.0f} | {ma / mh:.2f} | {vs} |")


if __name__ == "__main__":
    main()
