"""The `neuraflux` console script: generate (streaming to the terminal), and the subcommands later issues add."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def load_model_arg(source: str, quantize: str | None = None):
    """`--model` (and `--quantize`): the model in eval mode, or exit with one line naming the argument and what is
    wrong."""
    from neuraflux.model.io import load_for_inference
    from neuraflux.model.quantize import QuantizationError

    try:
        return load_for_inference(source, quantize)
    except QuantizationError as err:
        raise SystemExit(
            f"error: --quantize {quantize}: {err}" if quantize else f"error: --model {source}: {err}"
        ) from None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --model {source}: {err}") from None


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """--quantize and --compile, for every command that decodes."""
    from neuraflux.model.quantize import MODES

    parser.add_argument(
        "--quantize",
        choices=MODES,
        default=None,
        help="int8 weights (int8-dynamic: int8 activations too), with torchao; see docs/BENCHMARKS.md",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode with torch.compile'd steps (compiles for seconds first; pays with --quantize, see BENCHMARKS)",
    )


def load_generate_constitution(spec: str, model_source: str):
    """(constitution, world or None) for --constitution: `default` or a YAML path. The world is the one the model
    was trained on (its run's config.yaml), needed only by judge-checked principles."""
    from neuraflux.feedback.constitution import Constitution

    try:
        constitution = Constitution.load(spec)
    except ValueError as err:
        raise SystemExit(f"error: --constitution: {err}") from None
    if not constitution.needs_world:
        return constitution, None
    from neuraflux.eval import world_config_for
    from neuraflux.world import generate_world

    path = Path(model_source)
    return constitution, generate_world(world_config_for(path if path.is_dir() else path.parent))


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the argument, what argparse lets through but generation cannot mean (nan, inf and
    negative temperatures, top-p outside (0, 1], no tokens to generate, an empty prompt): before the model is loaded,
    not as a sampling error or a silent empty answer after it."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SystemExit(f"error: --temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:  # nan fails the comparison too
        raise SystemExit(f"error: --top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"error: --top-k must be a positive integer, got {args.top_k}")
    if args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if not args.prompt:
        raise SystemExit("error: --prompt is empty: give the text to continue (with --chat, the user's message)")


def check_compile_arg(args: argparse.Namespace, model) -> None:
    from neuraflux.model.generation import check_compilable

    if args.compile:
        try:
            check_compilable(model)
        except ValueError as err:
            raise SystemExit(f"error: --compile: {err}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    check_generate_args(args)
    if (args.docs or args.world or args.store) and not args.chat:
        raise SystemExit(
            "error: --docs, --world and --store need --chat: retrieved documents go in the chat format's context turn"
        )
    import torch

    from neuraflux.chat import Message, escape_special, render_prompt
    from neuraflux.model import generate_stream
    from neuraflux.tokenizer import StreamDecoder

    if args.quantize is not None and args.dtype != "float32":
        raise SystemExit("error: --dtype and --quantize: give one (an int8 model computes in float32)")
    torch.manual_seed(args.seed)
    model, tok = load_model_arg(args.model, args.quantize)
    check_compile_arg(args, model)
    # bfloat16 weights halve the bytes a decoding step reads, which is what bounds it at batch 1 on a CPU
    # (docs/BENCHMARKS.md, "Generation"); sampling still runs on float32 logits
    if args.quantize is None:
        model = model.to(getattr(torch, args.dtype))
    if args.constitution is not None:
        import logging

        constitution, world = load_generate_constitution(args.constitution, args.model)
        # the filter logs its event ("revised a response breaking [...]"): show that logger's records on stderr
        filter_log = logging.getLogger("neuraflux.feedback.constitution")
        filter_log.setLevel(logging.INFO)
        if not filter_log.handlers:
            filter_log.addHandler(logging.StreamHandler(sys.stderr))
    sources = []
    if args.docs or args.world or args.store:  # the question with the retrieved documents as its context turn
        from neuraflux.rag import NanoRAG
        from neuraflux.terminal import build_store

        try:
            store = build_store(args.docs, args.world, args.store)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        k = retrieval_k(args)
        rag = NanoRAG(model, tok, store, k=k)
        text, sources = rag.build_prompt(args.prompt, store.search(args.prompt, k), args.max_new_tokens)
    else:
        # the prompt is text: with --chat one user turn, without it raw text; neither can hold a special token
        text = render_prompt([Message("user", args.prompt)]) if args.chat else escape_special(args.prompt)
    ids = tok.encode(text)
    window = model.config.max_position_embeddings
    # Past the model's context the window slides: each round reads the last `window - step` tokens and writes up to
    # `step` more (the KV cache is rebuilt each round), so a continuation may be longer than the context.
    step = min(args.max_new_tokens, max(1, window // 2))
    if len(ids) > window - step:
        print(
            f"note: the prompt is {len(ids)} tokens and the model reads {window} at a time: it sees the last "
            f"{window - step} of them",
            file=sys.stderr,
        )
    if not args.chat:
        sys.stdout.write(args.prompt)
    decoder = StreamDecoder(tok)
    stops = [tok.eos_id, tok.end_id] if args.chat else [tok.eos_id]
    # With a constitution nothing is shown before the whole response is checked (and revised if it breaks a principle).
    held: list[str] | None = [] if args.constitution is not None else None
    left, stopped = args.max_new_tokens, False
    while left > 0 and not stopped:
        n = min(step, left)
        context = ids[-(window - n) :]
        for token, finished in generate_stream(
            model,
            torch.tensor([context]),
            n,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=stops,
            compile=args.compile,
        ):
            if bool(finished[0]):
                stopped = True
                break
            ids.append(int(token[0]))
            left -= 1
            piece = decoder.push(int(token[0]))
            if held is not None:
                held.append(piece)
                continue
            sys.stdout.write(piece)
            sys.stdout.flush()
    if held is None:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        response = "".join(held) + decoder.flush()
        sys.stdout.write(constitution.filter(args.prompt, response, world).response + "\n")
    sys.stdout.flush()
    for hit in sources:  # after the answer, on stderr: stdout stays the answer alone
        print(f"source [{hit.id}] {hit.text[:70].strip()}  ({hit.score:.2f})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuraflux", description="NeuraFlux: train, evaluate and chat with small LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a continuation (or, with --chat, an answer) to the terminal")
    g.add_argument("--model", required=True, help="run directory, model directory or .ckpt file")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user turn and stop at the end of the answer"
    )
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights and activations while decoding (bfloat16: faster, slightly different numbers)",
    )
    g.add_argument(
        "--constitution",
        default=None,
        help="`default` or a constitution YAML: check the whole response and revise it if it breaks a principle",
    )
    g.add_argument(
        "--docs", nargs="+", default=None, help="with --chat: text/markdown files or folders to retrieve from"
    )
    g.add_argument("--world", action="store_true", help="with --chat: retrieve from the built-in world's documents")
    g.add_argument("--store", default=None, help="with --chat: a store written by `neuraflux index` to retrieve from")
    g.add_argument("--k", type=int, default=None, help="documents retrieved (default: conf/retrieval k)")
    add_speed_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="an interactive session in the terminal, with retrieval over --docs or --world")
    c.add_argument("--model", required=True, help="run directory, model directory or .ckpt file")
    c.add_argument("--docs", nargs="+", default=None, help="text/markdown files or folders to retrieve from")
    c.add_argument("--world", action="store_true", help="retrieve from the built-in world's documents")
    c.add_argument("--store", default=None, help="a store written by `neuraflux index` to retrieve from")
    c.add_argument("--k", type=int, default=None, help="documents retrieved per question (default: conf/retrieval k)")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.7)
    add_speed_args(c)
    c.set_defaults(func=cmd_chat)
    from neuraflux.model.quantize import MODES

    q = sub.add_parser("quantize", help="write an int8 copy of a model that loads without re-quantizing")
    q.add_argument("model", help="run directory, model directory or .ckpt file (float)")
    q.add_argument("out", type=Path, help="the quantized model directory to write (must not exist or be empty)")
    q.add_argument("--mode", choices=MODES, default="int8")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("index", help="chunk and embed text/markdown files into a retrieval store (conf/retrieval)")
    i.add_argument(
        "items", nargs="+", metavar="PATH_OR_KEY=VALUE",
        help="files and folders (.txt, .md, .markdown, .rst), and retrieval settings as key=value (index=hnsw k=3)",
    )  # fmt: skip
    i.add_argument("--out", type=Path, required=True, help="the store directory to write (chat/generate --store)")
    i.set_defaults(func=cmd_index)
    d = sub.add_parser("data", help="the public datasets NeuraFlux knows: list them, fetch one into data/")
    d.add_argument("action", choices=["list", "fetch"])
    d.add_argument("source", nargs="?", help="a name from `neuraflux data list`, an http(s) address or a hub name")
    d.add_argument("--out", type=Path, default=Path("data"), help="where to write (default: data/)")
    d.add_argument("--split", default="train", help="a hub dataset's split")
    d.add_argument("--force", action="store_true", help="replace a file that exists")
    d.set_defaults(func=cmd_data)
    s = sub.add_parser(
        "serve",
        help="WebSocket + OpenAI-style HTTP server and a chat page (see `neuraflux serve --help`)",
        add_help=False,
    )
    s.set_defaults(func=cmd_serve)
    e = sub.add_parser("export", help="write a model for other libraries (hf: transformers, no custom code)")
    e.add_argument("model", help="run directory, model directory or .ckpt file")
    e.add_argument("out", type=Path, help="the directory to write (absent or empty, unless --force)")
    e.add_argument("--format", default="hf", help="hf: a GPT-2 / GPT-NeoX checkpoint, tokenizer and model card")
    e.add_argument("--force", action="store_true", help="write into a non-empty OUT, replacing same-named files")
    e.set_defaults(func=cmd_export)
    from neuraflux.feedback.export import FORMATS as FEEDBACK_FORMATS

    f = sub.add_parser("feedback", help="human feedback collected by `serve feedback_db=...`: export it")
    fx = f.add_subparsers(dest="feedback_command", required=True).add_parser(
        "export", help="votes as JSON lines for data=preference, data=kto or data=sft"
    )
    fx.add_argument("db", type=Path, help="the feedback database (a SQLite file)")
    fx.add_argument("--format", choices=FEEDBACK_FORMATS, required=True)
    fx.add_argument("--out", type=Path, required=True, help="the .jsonl file to write (must not exist)")
    fx.set_defaults(func=cmd_feedback_export)
    return parser


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from neuraflux.feedback.export import export_feedback
    from neuraflux.feedback.store import FeedbackUnavailable

    if args.out.exists():
        raise SystemExit(f"error: --out {args.out} already exists: give a new file")
    try:
        result = export_feedback(args.db, args.format, args.out)
    except (FeedbackUnavailable, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    skipped = "".join(f"; skipped {n}: {reason}" for reason, n in sorted(result.skipped.items()))
    print(f"wrote {args.out}: {len(result.records)} {args.format} records{skipped}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from neuraflux.model.export import export_model

    try:
        out = export_model(args.model, args.out, args.format, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}: transformers' AutoModelForCausalLM and AutoTokenizer load it")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from neuraflux.terminal import Chat, build_store

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SystemExit(f"error: --temperature must be a number >= 0, got {args.temperature}")
    if (args.k is not None and args.k < 1) or args.max_new_tokens < 1:
        raise SystemExit("error: --k and --max-new-tokens must be at least 1")
    try:
        store = build_store(args.docs, args.world, args.store)  # before the model: a bad path fails at once
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    model, tokenizer = load_model_arg(args.model, args.quantize)
    check_compile_arg(args, model)
    chat = Chat(model, tokenizer, store, retrieval_k(args), args.max_new_tokens, args.temperature, compile=args.compile)
    return chat.run()


def cmd_quantize(args: argparse.Namespace) -> int:
    import shutil

    from neuraflux.model.quantize import quantized_size, save_quantized

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"error: {args.out} already exists and is not empty: give a new directory")
    model, tokenizer = load_model_arg(args.model, args.mode)
    save_quantized(model, tokenizer, args.out)
    source = Path(args.model)
    run_dir = source if source.is_dir() else source.parent
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file():  # the run's config: evaluation finds the world the model was trained on
            shutil.copyfile(candidate, args.out / "config.yaml")
            break
    print(f"wrote {args.out} ({args.mode}, {quantized_size(args.out) / 1e6:.2f} MB)")
    return 0


def retrieval_k(args: argparse.Namespace) -> int:
    """--k, else conf/retrieval's k."""
    from neuraflux.retrieval.documents import load_retrieval_settings

    return args.k if args.k is not None else load_retrieval_settings().k


def cmd_index(args: argparse.Namespace) -> int:
    from neuraflux.retrieval import RetrievalError
    from neuraflux.retrieval.documents import index_documents, load_retrieval_settings

    overrides = [p for p in args.items if "=" in p and not Path(p).exists()]
    paths = [p for p in args.items if p not in overrides]
    if not paths:
        raise SystemExit("error: no files or folders to index: give at least one PATH")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"error: {args.out} already exists and is not empty: give a new directory")
    try:
        settings = load_retrieval_settings(overrides)
        store = index_documents(paths, settings)
    except (RetrievalError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    store.save(args.out)
    files = len({i.rsplit("#", 1)[0] for i in store.ids})
    kind = f"{settings.index} index, {settings.embedder['type']} embedder"
    print(f"wrote {args.out}: {len(store)} chunks of {files} files ({kind})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from neuraflux.data.catalog import FetchError, fetch, listing

    if args.action == "list":
        print(listing())
        return 0
    if not args.source:
        raise SystemExit("error: data fetch needs a NAME (neuraflux data list), an http(s) address or a hub name")
    try:
        path = fetch(args.source, args.out, force=args.force, split=args.split)
    except FetchError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from neuraflux.serve import main as serve_main

    return serve_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server parses its own arguments (and Hydra-style key=value overrides)
        args = argparse.Namespace(func=cmd_serve, rest=argv[1:])
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command == "index" and not any(e.startswith("-") for e in extra):
            args.items += extra  # paths and key=value settings may also follow --out
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
