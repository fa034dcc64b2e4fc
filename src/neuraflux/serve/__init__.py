"""The server: WebSocket streaming, OpenAI-style HTTP endpoints and a chat page, on continuous batching.

    neuraflux serve --model outputs/run [--host 127.0.0.1] [--port 8000] [key=value ...]

The only package that imports the web stack (fastapi, uvicorn).
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as err:  # one door for the optional web stack, naming the extra to install
    raise ImportError(
        f'neuraflux.serve needs the web stack ({err.name} is missing): pip install -e ".[serve]"'
    ) from err

import argparse
import dataclasses
import logging
from pathlib import Path

from neuraflux.model.quantize import MODES as QUANT_MODES
from neuraflux.serve.app import builtin_world, create_app, load_constitution, load_retriever
from neuraflux.serve.config import ServeConfig, load_serve_config
from neuraflux.serve.engine import Engine, GenerationRequest
from neuraflux.serve.protocol import ERROR_CODES, ServeError

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_CODES",
    "Engine",
    "GenerationRequest",
    "ServeConfig",
    "ServeError",
    "build_parser",
    "create_app",
    "load_serve_config",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuraflux serve", description="Serve a model over WebSocket, HTTP and a chat page."
    )
    p.add_argument("--model", required=True, help="run directory, model directory or .ckpt file")
    p.add_argument("--host", default=None, help="bind address (default from conf/serve: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env NEURAFLUX_API_KEY)")
    p.add_argument("--config", type=Path, default=None, help="a serve YAML instead of conf/serve/default.yaml")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None, help="serve an int8 copy (torchao)")
    p.add_argument(
        "--compile", action="store_true", default=None, help="decode with torch.compile'd steps (serve.compile=true)"
    )
    p.add_argument("--compare-model", default=None, help="a second model: compare=true gets a blind answer from each")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. max_concurrent=16 retrieval=world")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, check the config and the constitution, load the model and retriever, then run uvicorn until
    interrupted."""
    import torch

    from neuraflux.model.io import load_for_inference
    from neuraflux.model.quantize import QuantizationError
    from neuraflux.serve.config import DEFAULT_CONFIG
    from neuraflux.serve.guard import uvicorn_config

    args = build_parser().parse_args(argv)
    if args.config is not None and not args.config.is_file():
        raise SystemExit(f"error: --config {args.config}: no such file")
    try:
        config = load_serve_config(args.overrides, args.config or DEFAULT_CONFIG)
        flags = (
            ("host", args.host),
            ("port", args.port),
            ("api_key", args.api_key),
            ("quantize", args.quantize),
            ("compile", args.compile),
        )
        given = {k: v for k, v in flags if v is not None}
        config = dataclasses.replace(config, **given)  # re-runs the checks
        constitution = load_constitution(config.constitution)  # create_app loads it again; here it fails early
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if config.feedback_db is not None:  # a damaged file or a newer schema: say so before loading a model
        from neuraflux.feedback.store import FeedbackStore, FeedbackUnavailable

        try:
            FeedbackStore(config.feedback_db, timeout_s=config.feedback_timeout_s).open().close()
        except FeedbackUnavailable as err:
            raise SystemExit(f"error: serve.feedback_db: {err}") from None
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        model, tokenizer = load_for_inference(args.model, config.quantize)
    except QuantizationError as err:
        raise SystemExit(f"error: quantize={config.quantize}: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --model {args.model}: {err}") from None
    compare_model = None
    if args.compare_model is not None:
        try:
            other, other_tokenizer = load_for_inference(args.compare_model, config.quantize)
        except (QuantizationError, FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: --compare-model {args.compare_model}: {err}") from None
        compare_model = (other, other_tokenizer, Path(args.compare_model).resolve().name)
    needs_world = config.retrieval == "world" or (constitution is not None and constitution.needs_world)
    world = builtin_world() if needs_world else None  # one world for both retrieval and the judges
    try:
        retriever = load_retriever(config.retrieval, world)
    except ValueError as err:  # a damaged store, or a bad conf/retrieval setting (RetrievalError names the key)
        raise SystemExit(f"error: serve.retrieval={config.retrieval}: {err}") from None
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    try:
        app = create_app(
            config, model, tokenizer, retriever, Path(args.model).resolve().name, world, compare_model=compare_model
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    import uvicorn

    uvicorn.Server(uvicorn_config(app, config)).run()
    return 0
