"""Load on the server: N concurrent WebSocket clients on loopback, each asking one question after another.

For each client count (default 1, 8, 32) the clients run for --seconds (requests in flight at the end finish);
reported: time to first token p50/p99, per-stream tokens/s (a request's tokens over its own wall time),
aggregate tokens/s (all tokens over the level's wall time), and errors by code. Target: aggregate at 8 clients
>= 3x one client, and no errors while clients <= max_concurrent + max_queue.

Without --model, a random model of the `tiny` shape (conf/model/tiny.yaml: 4 layers, 128 wide) over a character
vocabulary, with the special tokens' embeddings zeroed so every answer runs to --max-new-tokens.
Needs the serve extra: pip install -e ".[serve]".

    python bench/serve_load.py --threads 1 --clients 1 8 32 --seconds 10
    python bench/serve_load.py --model RUN --weights float32 int8 --clients 1 8    # one server each, levels alternating
    python bench/serve_load.py --compile --clients 1 8 --max-concurrent 8           # eager against serve.compile=true
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.serve import ServeConfig, create_app  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

QUESTIONS = ["what is the tallest tower?", "who founded the city of zorn?", "hi", "tell me about bread and salt"]


@dataclass
class Level:
    clients: int
    ttft: list[float] = field(default_factory=list)  # seconds from send to first token, per request
    stream_rates: list[float] = field(default_factory=list)  # tokens/s of each request
    tokens: int = 0
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    wall: float = 0.0

    def row(self) -> dict:
        q = sorted(self.ttft) or [float("nan")]
        return {
            "clients": self.clients,
            "requests": self.requests,
            "ttft_p50_ms": 1000 * q[len(q) // 2],
            "ttft_p99_ms": 1000 * q[min(len(q) - 1, round(0.99 * (len(q) - 1)))],
            "stream_tok_s": statistics.median(self.stream_rates) if self.stream_rates else 0.0,
            "aggregate_tok_s": self.tokens / self.wall if self.wall else 0.0,
            "errors": dict(self.errors),
        }


def random_model() -> tuple[NanoLM, NanoTokenizer]:
    tok = NanoTokenizer.train(["abcdefghijklmnopqrstuvwxyz ?.,"], vocab_size=0, mode="char")
    torch.manual_seed(0)
    cfg = NanoConfig(
        vocab_size=tok.vocab_size, block_size=256, max_position_embeddings=512, n_layer=4, n_head=4, n_embd=128
    )
    model = NanoLM(cfg).eval()
    with torch.no_grad():
        for i in range(tok.token_to_id("<|unk|>") + 1):
            model.transformer.embeddings.token.weight[i].zero_()  # never sampled greedily: full-length answers
    return model, tok


def start_server(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"ws://127.0.0.1:{port}/ws", server, thread


async def client(url: str, index: int, deadline: float, level: Level, max_new_tokens: int) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        n = 0
        while time.perf_counter() < deadline:
            rid = f"{index}-{n}"
            n += 1
            sent = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "generate",
                        "id": rid,
                        "prompt": QUESTIONS[(index + n) % len(QUESTIONS)],
                        "max_new_tokens": max_new_tokens,
                        "temperature": 0,
                    }
                )
            )
            first = None
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "token" and first is None:
                    first = time.perf_counter()
                    level.ttft.append(first - sent)
                elif msg["type"] == "done":
                    got = msg["usage"]["completion_tokens"]
                    level.tokens += got
                    level.requests += 1
                    level.stream_rates.append(got / (time.perf_counter() - sent))
                    break
                elif msg["type"] == "error":
                    level.errors[msg["code"]] += 1
                    break


async def run_level(url: str, clients: int, seconds: float, max_new_tokens: int) -> Level:
    level = Level(clients)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(url, i, t0 + seconds, level, max_new_tokens) for i in range(clients)))
    level.wall = time.perf_counter() - t0
    return level


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="run or model directory; default: a random tiny-shaped model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-concurrent", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--weights", nargs="+", default=["float32"], choices=["float32", "int8", "int8-dynamic"],
                   help="one server per choice; each client level runs on each in turn")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="beside each --weights server, one with serve.compile=true")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from neuraflux.model.quantize import quantize_model

    models = {}
    for weights in args.weights:
        if args.model:
            from neuraflux.model.io import load_for_inference

            models[weights] = load_for_inference(args.model, None if weights == "float32" else weights)
        else:
            model, tok = random_model()
            models[weights] = (model if weights == "float32" else quantize_model(model, weights), tok)
    config = ServeConfig(
        max_new_tokens=max(args.max_new_tokens, 1),
        default_max_new_tokens=1,
        temperature=0.0,
        top_p=None,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
    )
    servers = {
        w: start_server(create_app(config, model, tok, model_name="bench")) for w, (model, tok) in models.items()
    }
    if args.compile:
        compiled = dataclasses.replace(config, compile=True)
        for w, (model, tok) in models.items():
            t0 = time.perf_counter()
            servers[f"{w} compiled"] = start_server(create_app(compiled, model, tok, model_name="bench"))
            print(f"{w} compiled: the server started in {time.perf_counter() - t0:.0f} s (every shape compiled)")
    rows = []
    try:
        for url, _, _ in servers.values():
            asyncio.run(run_level(url, 1, 1.0, 8))  # warm-up (a compiled engine compiled every shape at its start)
        for n in args.clients:
            for weights, (url, _, _) in servers.items():
                rows.append(
                    {"weights": weights, **asyncio.run(run_level(url, n, args.seconds, args.max_new_tokens)).row()}
                )
    finally:
        for _, server, thread in servers.values():
            server.should_exit = True
            thread.join(10)
    print(
        f"torch threads {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}, "
        f"max_concurrent {args.max_concurrent}, {args.seconds:g} s per level"
    )
    print(
        f"{'server':>16} {'clients':>7} {'requests':>8} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'stream tok/s':>12} "
        f"{'aggregate tok/s':>15}  errors"
    )
    for r in rows:
        print(
            f"{r['weights']:>16} {r['clients']:>7} {r['requests']:>8} {r['ttft_p50_ms']:>11.1f} "
            f"{r['ttft_p99_ms']:>11.1f} {r['stream_tok_s']:>12.1f} {r['aggregate_tok_s']:>15.1f}  {r['errors'] or '-'}"
        )
    for weights in servers:
        base = next((r for r in rows if r["clients"] == 1 and r["weights"] == weights), None)
        eight = next((r for r in rows if r["clients"] == 8 and r["weights"] == weights), None)
        if base and eight:
            print(
                f"{weights}: aggregate at 8 clients / 1 client: "
                f"{eight['aggregate_tok_s'] / base['aggregate_tok_s']:.2f}x (target >= 3x)"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
