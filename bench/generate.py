"""Greedy decoding speed of the `nano` shape against Hugging Face transformers' GPT-2 of the same shape.

Both with a KV cache, random weights (built offline, nothing downloaded), prompt 32 tokens, 256 new tokens, at
batch 1 and 8. Weights: float32 and bfloat16 (both models cast whole, `model.to(dtype)`), and for NeuraFlux also
int8 and int8-dynamic (model/quantize.py; GPT-2 runs in float32 beside them). Rounds alternate NeuraFlux and GPT-2
so both see the same machine load; medians are compared.

It prints the CPU's matmul flags (AMX, AVX512-BF16, VNNI) and the memory bandwidth measured in the same run, and
per NeuraFlux row the weight bandwidth a batch-1 step achieves: the bytes of every weight read per token
(model/quantize.py's int8 layout for int8 rows) times tokens per second. Above the DRAM figure, the weights are
being read from cache.
Needs the bench and quantize extras: pip install -e ".[bench,quantize]".

    python bench/generate.py --threads 1 --rounds 3 [--weights float32 bfloat16 int8 int8-dynamic]
    python bench/generate.py --threads 1 --profile     # where a batch-1 step goes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, memory_bandwidth  # noqa: E402

from neuraflux.model import NanoConfig, NanoLM, generate  # noqa: E402
from neuraflux.model.quantize import MODES, quantize_model  # noqa: E402

SHAPE = dict(vocab_size=10_000, n_layer=6, n_head=6, n_embd=384, max_position_embeddings=512)


def nano(weights: str) -> NanoLM:
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(block_size=512, **SHAPE)).eval()
    if weights in MODES:
        return quantize_model(model, weights)
    return model.to(getattr(torch, weights))


def weight_bytes(model: NanoLM) -> int:
    """Bytes a batch-1 step reads: every weight tensor (int8 data and scales for quantized ones), the embedding and
    position tables excepted (a step reads one row of each)."""
    total = 0
    for name, p in model.named_parameters():
        if "embeddings" in name:
            continue
        parts = [p.qdata, p.scale] if hasattr(p, "qdata") else [p]
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def ours(batch: int, prompt: int, new: int, weights: str, compile: bool = False) -> float:
    model = nano(weights)
    ids = torch.randint(10, 10_000, (batch, prompt))
    # warm-up; compiled, the whole length, so the timed run finds its (batch, capacity) compiled
    generate(model, ids, new if compile else 4, temperature=0, compile=compile)
    t0 = time.perf_counter()
    out = generate(model, ids, new, temperature=0, compile=compile)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new)
    return batch * new / dt


def profile(prompt: int, new: int) -> None:
    """Where a batch-1 float32 decoding step goes, and the output projection alone in float32 and bfloat16."""
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = NanoLM(NanoConfig(block_size=512, **SHAPE)).eval()
    ids = torch.randint(10, 10_000, (1, prompt))
    generate(model, ids, 4, temperature=0)
    with torch_profile() as prof:
        generate(model, ids, new, temperature=0)
    events = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    matmul = events.get("aten::addmm", 0) + events.get("aten::mm", 0)
    print(
        f"batch 1 float32, {new} steps: aten::addmm + aten::mm = {100 * matmul / sum(events.values()):.0f} % of "
        "self CPU time"
    )
    x, w = torch.randn(1, SHAPE["n_embd"]), torch.randn(SHAPE["vocab_size"], SHAPE["n_embd"])
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        torch.nn.functional.linear(xd, wd)
        t0 = time.perf_counter()
        for _ in range(200):
            torch.nn.functional.linear(xd, wd)
        print(
            f"output projection ({SHAPE['vocab_size']} x {SHAPE['n_embd']}, one token), {dtype}: "
            f"{(time.perf_counter() - t0) / 200 * 1e3:.2f} ms"
        )
    for mode in MODES:  # where one quantized linear layer's call goes (the MLP's 384 -> 1536, one token)
        layer = torch.nn.Sequential(torch.nn.Linear(SHAPE["n_embd"], 4 * SHAPE["n_embd"])).eval()
        quantize_model_layers(layer, mode)
        x = torch.randn(1, SHAPE["n_embd"])
        with torch.no_grad(), torch_profile() as prof:
            for _ in range(50):
                layer(x)
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:4]
        print(f"{mode} linear, per call: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 50:.0f} us" for e in top))


def quantize_model_layers(module: torch.nn.Module, mode: str) -> None:
    """torchao's config for `mode` applied to a module's linear layers, as model/quantize.py applies it."""
    from neuraflux.model.quantize import torchao_config, torchao_quantization

    torchao_quantization().quantize_(module, torchao_config(mode))


def hf(batch: int, prompt: int, new: int, weights: str) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=SHAPE["vocab_size"],
        n_positions=SHAPE["max_position_embeddings"],
        n_embd=SHAPE["n_embd"],
        n_layer=SHAPE["n_layer"],
        n_head=SHAPE["n_head"],
    )
    # GPT-2 has no int8 path here: beside an int8 row it runs in float32
    model = GPT2LMHeadModel(cfg).eval().to(getattr(torch, weights if weights not in MODES else "float32"))
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
    p.add_argument(
        "--weights", nargs="+", choices=["float32", "bfloat16", *MODES], default=["float32", "bfloat16", *MODES]
    )
    p.add_argument(
        "--compile", action="store_true", help="also rows decoded with --compile (not int8-dynamic: refused)"
    )
    p.add_argument("--profile", action="store_true", help="only: the matmul share of a step and the projection timings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(args.threads))
    dram = memory_bandwidth(args.threads)
    print(f"memory bandwidth (copy, {args.threads} threads): {dram / 1e9:.1f} GB/s")
    print(f"prompt={args.prompt}, new={args.new}")
    if args.profile:
        profile(args.prompt, 64)
        return
    print(
        "| batch | weights | NeuraFlux tokens/s | GPT-2 (transformers) tokens/s | ratio | NeuraFlux vs GPT-2 float32 "
        "| weight MB/step | weight GB/s (batch 1) | of DRAM |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        medians = {}
        rows = [(w, False) for w in args.weights]
        rows += [(w, True) for w in args.weights if args.compile and w != "int8-dynamic"]
        for name, compiled in rows:
            a, h = [], []
            for _ in range(args.rounds):
                a.append(ours(b, args.prompt, args.new, name, compiled))
                h.append(hf(b, args.prompt, args.new, name))
            medians[name + (" compiled" if compiled else "")] = statistics.median(a), statistics.median(h)
        base = medians.get("float32", (None, None))[1]
        for name, (ma, mh) in medians.items():
            vs = f"{ma / base:.2f}" if base else "–"
            step_bytes = weight_bytes(nano(name.split()[0]))
            rate = f"{step_bytes * ma / 1e9:.1f} | {step_bytes * ma / dram:.0%}" if b == 1 else "– | –"
            print(f"| {b} | {name} | {ma:.0f} | {mh:.0f} | {ma / mh:.2f} | {vs} | {step_bytes / 1e6:.1f} | {rate} |")


if __name__ == "__main__":
    main()
