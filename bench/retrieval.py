"""Retrieval benchmark: index build time, query latency and recall@k against exact search, per index kind.

    python bench/retrieval.py                          # 10k and 100k chunks, every index kind
    python bench/retrieval.py --sizes 10000 --threads 2

Chunks and queries are synthetic and seeded (neuraflux.retrieval.synthetic), embedded with the lexical
embedder. Embedding the corpus is timed once per size and reported apart from index build; query latency is
one query at a time (embedding, then index search), as a RAG prompt would issue it. Recall@k is the share of
exact (flat) top-k rows an index also returns. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from neuraflux.retrieval import LexicalEmbedder, VectorIndex, build_index
from neuraflux.retrieval.index import get_threads, set_threads
from neuraflux.retrieval.synthetic import synthetic_chunks, synthetic_queries


@dataclass(frozen=True)
class Row:
    size: int
    kind: str
    params: dict[str, int]
    embed_s: float  # embedding the whole corpus (same for every kind of one size)
    build_s: float  # train + add
    query_embed_ms: float  # p50 of embedding one query
    search_p50_ms: float
    search_p99_ms: float
    recall: float  # recall@k against exact search


def index_params(kind: str, size: int, args: argparse.Namespace) -> dict[str, int]:
    if kind == "ivf":
        # the usual rule of thumb: about sqrt(N) cells
        return {"nlist": args.nlist or max(1, round(math.sqrt(size))), "nprobe": args.nprobe}
    if kind == "hnsw":
        return {"M": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": args.ef_search}
    return {}


def timed_search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search one query at a time; returns (rows (Q, k), seconds per query (Q,))."""
    rows, seconds = [], []
    for q in queries:
        start = time.perf_counter()
        result = index.search(q[None, :], k)
        seconds.append(time.perf_counter() - start)
        rows.append(result.rows[0])
    return np.stack(rows), np.array(seconds)


def recall_against(exact: np.ndarray, found: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k; exact, found: (Q, k) row numbers."""
    return float(np.mean([len(set(e) & set(f)) / len(e) for e, f in zip(exact, found)]))


def bench_size(size: int, args: argparse.Namespace) -> list[Row]:
    embedder = LexicalEmbedder(dim=args.dim)
    chunks = synthetic_chunks(size, seed=args.seed)
    queries = synthetic_queries(chunks, args.queries, seed=args.seed + 1).queries

    start = time.perf_counter()
    vectors = embedder.embed(chunks)  # (N, dim)
    embed_s = time.perf_counter() - start
    query_seconds = []
    for q in queries:
        start = time.perf_counter()
        embedder.embed([q])
        query_seconds.append(time.perf_counter() - start)
    query_vectors = embedder.embed(queries)  # (Q, dim)

    rows, exact = [], None
    for kind in args.kinds_ordered:
        params = index_params(kind, size, args)
        index = build_index(kind, args.dim, **params)
        start = time.perf_counter()
        index.add(vectors)
        build_s = time.perf_counter() - start
        found, seconds = timed_search(index, query_vectors, args.k)
        if exact is None:
            exact = found  # flat runs first: exact search is the reference
        rows.append(
            Row(
                size=size,
                kind=kind,
                params=params,
                embed_s=embed_s,
                build_s=build_s,
                query_embed_ms=1e3 * float(np.median(query_seconds)),
                search_p50_ms=1e3 * float(np.percentile(seconds, 50)),
                search_p99_ms=1e3 * float(np.percentile(seconds, 99)),
                recall=recall_against(exact, found),
            )
        )
    return rows


def markdown(rows: list[Row], k: int) -> str:
    header = (
        f"| chunks | index | settings | embed corpus (s) | build (s) | embed query p50 (ms) | "
        f"search p50 (ms) | search p99 (ms) | recall@{k} vs exact |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "-"
        lines.append(
            f"| {r.size:,} | {r.kind} | {settings} | {r.embed_s:.1f} | {r.build_s:.2f} | {r.query_embed_ms:.2f} | "
            f"{r.search_p50_ms:.2f} | {r.search_p99_ms:.2f} | {r.recall:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="corpus sizes (chunks)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["flat", "ivf", "hnsw"],
        choices=["flat", "ivf", "hnsw"],
        help="index kinds; flat always runs, as the reference",
    )
    parser.add_argument("--queries", type=int, default=200, help="queries per size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=LexicalEmbedder().dim, help="lexical embedder width")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS and torch threads")
    parser.add_argument("--nlist", type=int, default=0, help="ivf cells; 0: about sqrt(chunks)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # exact search must run first: the others are scored against it
    args.kinds_ordered = ["flat"] + [kind for kind in dict.fromkeys(args.kinds) if kind != "flat"]

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows = [row for size in args.sizes for row in bench_size(size, args)]
    print(
        f"Retrieval benchmark: lexical embedder dim={args.dim}, {args.queries} queries of 5 words, k={args.k}, "
        f"seed={args.seed}; FAISS threads={get_threads()}, torch threads={torch.get_num_threads()}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible\n"
    )
    print(markdown(rows, args.k))


if __name__ == "__main__":
    main()
