"""Greedy decoding speed of the `nano` shape against Hugging Face transformers' GPT-2 of the same shape.

Both with a KV cache, random weights (built offline, nothing downloaded), prompt 32 tokens, 256 new tokens, at
batch 1 and 8. Weights: float32 and bfloat16 (both models cast whole, `model.to(dtype)`), and for NeuraFlux also
int8 and int8-dynamic (model/quantize.py, its default fused kernels) and int8-torchao (int8 computed by torchao's
own kernels: the reference the fused path is tested against); GPT-2 runs in float32 beside them. Each round runs
every row once, NeuraFlux then GPT-2, so all rows see the same machine load; medians are compared. Each model is
built once (compiled rows compile once per batch size, in a warm-up).

It prints the CPU's matmul flags (AMX, AVX512-BF16, VNNI) and the memory bandwidth measured in the same run, and
per NeuraFlux row the weight bandwidth a batch-1 step achieves: the bytes of every weight read per token
(model/quantize.py's int8 layout for int8 rows) times tokens per second. Above the DRAM figure, the weights are
being read from cache.
Needs the bench and quantize extras: pip install -e ".[bench,quantize]".

    python bench/generate.py --threads 1 --rounds 3 [--weights float32 bfloat16 int8 int8-dynamic int8-torchao]
    python bench/generate.py --threads 1 --profile     # where a batch-1 step goes; int8 layers at 1 and 8 rows
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
WEIGHTS = ["float32", "bfloat16", *MODES, "int8-torchao"]


def nano(weights: str) -> NanoLM:
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(block_size=512, **SHAPE)).eval()
    if weights == "int8-torchao":
        return quantize_model(model, "int8", kernel="torchao")
    if weights in MODES:
        return quantize_model(model, weights)
    return model.to(getattr(torch, weights))


def weight_bytes(model: NanoLM) -> int:
    """Bytes a batch-1 step reads: every weight tensor (int8 data and scales for quantized ones), the output head
    included (tied to the token table in float, so counted from the head), the embedding and position tables
    excepted (a step reads one row of each)."""
    total, tied = 0, model.lm_head.weight is model.transformer.embeddings.token.weight
    for name, p in model.named_parameters():
        if "embeddings" in name and not (tied and p is model.lm_head.weight):
            continue
        parts = [p.qdata, p.scale] if hasattr(p, "qdata") else [p]
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def ours(model: NanoLM, batch: int, prompt: int, new: int, compile: bool = False) -> float:
    ids = torch.randint(10, 10_000, (batch, prompt))
    generate(model, ids, 4, temperature=0)  # warm-up (compiled rows were warmed up once, in main)
    t0 = time.perf_counter()
    out = generate(model, ids, new, temperature=0, compile=compile)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new)
    return batch * new / dt


def profile(prompt: int, new: int) -> None:
    """Where a batch-1 decoding step goes (float32, int8 eager and int8 compiled: the top operators by self CPU
    time), the output projection alone in float32 and bfloat16, and one int8 linear layer's call per kernel at 1 and
    8 rows."""
    from torch.profiler import profile as torch_profile

    from neuraflux.model.quantize import Int8DynamicLinear, Int8Linear

    ids = torch.randint(10, 10_000, (1, prompt))
    for weights, compiled in (("float32", False), ("int8", False), ("int8", True)):
        model = nano(weights)
        generate(model, ids, new, temperature=0, compile=compiled)  # warm-up (and compilation)
        with torch_profile() as prof:
            t0 = time.perf_counter()
            generate(model, ids, new, temperature=0, compile=compiled)
            step_ms = (time.perf_counter() - t0) / new * 1e3
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        top = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %" for e in events[:5])
        name = weights + (" compiled" if compiled else "")
        print(f"batch 1 {name}, {new} steps, {step_ms:.2f} ms a step (profiled): {top}")
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
    layers = {}  # one quantized linear layer (the MLP's 384 -> 1536), per kernel, for 1 and 8 rows
    for mode in MODES:
        layers[f"{mode} (torchao)"] = torch.nn.Sequential(torch.nn.Linear(SHAPE["n_embd"], 4 * SHAPE["n_embd"]))
        quantize_model_layers(layers[f"{mode} (torchao)"].eval(), mode)
    layers["int8 (fused)"] = Int8Linear(layers["int8 (torchao)"][0])
    layers["int8-dynamic (fused)"] = Int8DynamicLinear(layers["int8-dynamic (torchao)"][0])
    for rows in (1, 8):
        x = torch.randn(rows, SHAPE["n_embd"])
        for name, layer in layers.items():
            with torch.no_grad(), torch_profile() as prof:
                for _ in range(50):
                    layer(x)
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:4]
            calls = ", ".join(f"{e.key} {e.self_cpu_time_total / 50:.0f} us" for e in top)
            print(f"{name} linear, {rows} row(s), per call: {calls}")


def quantize_model_layers(module: torch.nn.Module, mode: str) -> None:
    """torchao's config for `mode` applied to a module's linear layers, as model/quantize.py applies it."""
    from neuraflux.model.quantize import torchao_config, torchao_quantization

    torchao_quantization().quantize_(module, torchao_config(mode))


def gpt2(weights: str):
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
    return GPT2LMHeadModel(cfg).eval().to(torch.bfloat16 if weights == "bfloat16" else torch.float32)


def hf(model, batch: int, prompt: int, new: int) -> float:
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
    p.add_argument("--weights", nargs="+", choices=WEIGHTS, default=WEIGHTS)
    p.add_argument(
        "--compile", action="store_true", help="also rows decoded with --compile (not int8-dynamic: refused)"
    )
    p.add_argument(
        "--profile", action="store_true", help="only: where a batch-1 step goes; projection and int8 layer timings"
    )
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
    rows = [(w, False) for w in args.weights]
    rows += [(w, True) for w in args.weights if args.compile and w != "int8-dynamic"]
    models = {w: nano(w) for w in args.weights}
    references = {w: gpt2(w) for w in {"float32", *args.weights} & {"float32", "bfloat16"}}
    for b in args.batches:
        for name, compiled in rows:  # compile each (model, batch) once, for the longest capacity it will see
            if compiled:
                ids = torch.randint(10, 10_000, (b, args.prompt))
                generate(models[name], ids, args.new, temperature=0, compile=True)
        runs = {row: ([], []) for row in rows}
        for _ in range(args.rounds):
            for name, compiled in rows:
                ours_runs, hf_runs = runs[name, compiled]
                ours_runs.append(ours(models[name], b, args.prompt, args.new, compiled))
                reference = references["bfloat16" if name == "bfloat16" else "float32"]
                hf_runs.append(hf(reference, b, args.prompt, args.new))
        medians = {
            name + (" compiled" if compiled else ""): (statistics.median(a), statistics.median(h))
            for (name, compiled), (a, h) in runs.items()
        }
        base = statistics.median([h for (name, _), (_, hs) in runs.items() if name != "bfloat16" for h in hs])
        for name, (ma, mh) in medians.items():
            step_bytes = weight_bytes(models[name.split()[0]])
            rate = f"{step_bytes * ma / 1e9:.1f} | {step_bytes * ma / dram:.0%}" if b == 1 else "– | –"
            print(
                f"| {b} | {name} | {ma:.0f} | {mh:.0f} | {ma / mh:.2f} | {ma / base:.2f} | {step_bytes / 1e6:.1f} "
                f"| {rate} |"
            )
        print(f"| {b} | GPT-2 float32, median of every float32 run beside a row | | {base:.0f} | | 1.00 | | | |")


if __name__ == "__main__":
    main()
