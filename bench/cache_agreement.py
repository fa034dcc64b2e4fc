"""Does one question at a time (batch 1, as `neuraflux generate` and `NanoRAG.answer` decode) give the same answer
with the KV cache as without it? Exact match of each, and how many answers differ.

For the first `--limit` seen and unseen questions of the model's world, the retrieval prompt `NanoRAG` builds (top
document as context) is decoded greedily alone, once with the KV cache and once recomputing every position. The two
must agree token for token: a cache is an optimisation, not another model. Run it under an older checkout
(`PYTHONPATH=OLD/src python bench/cache_agreement.py ...`) to see what a code change did to answers.

    python bench/cache_agreement.py outputs/full/<time>/sft/model --limit 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# the model's own classes, not neuraflux.model.io: the script also runs under checkouts older than that module
from neuraflux.eval import world_config_for  # noqa: E402
from neuraflux.model import NanoLM, generate  # noqa: E402
from neuraflux.rag import NanoRAG, world_retriever  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402
from neuraflux.world import exact_match, generate_world, qa_items  # noqa: E402


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--limit", type=int, default=50, help="questions per split (seen, unseen)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = NanoLM.from_pretrained(args.model).eval(), NanoTokenizer.load(args.model)
    world = generate_world(world_config_for(args.model))
    rag = NanoRAG(model, tok, world_retriever(world), k=1)
    start = time.perf_counter()
    print(f"model {args.model}, {args.limit} questions per split, batch 1, greedy, {args.threads} thread(s)")
    print("| split | questions | exact match, KV cache | exact match, no cache | answers that differ |")
    print("|---|---:|---:|---:|---:|")
    for split in ("seen", "unseen"):
        items = qa_items(world, split)[: args.limit]
        hits = rag.retriever.search_batch([it.question for it in items], 1)
        em = {True: 0, False: 0}
        differ = 0
        for item, item_hits in zip(items, hits):
            prompt, _ = rag.build_prompt(item.question, item_hits, args.max_new_tokens)
            ids = torch.tensor([tok.encode(prompt)])
            answers = {}
            for cached in (True, False):
                out = generate(model, ids, args.max_new_tokens, temperature=0.0,
                               eos_token_id=[tok.end_id, tok.eos_id], use_kv_cache=cached)  # fmt: skip
                answers[cached] = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
                em[cached] += exact_match(answers[cached], item.answer)
            differ += answers[True] != answers[False]
        n = len(items)
        print(f"| {split} | {n} | {em[True] / n:.3f} | {em[False] / n:.3f} | {differ} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
