"""SFT step cost: logits at every position against logits at the supervised (response) positions only.

Both forms give the same loss and gradients (tests/test_train.py); this measures what skipping the head
projection and softmax over prompt tokens buys. Real batches of the built-in world's SFT data
(`conf/world/default.yaml`'s mix) on the `tiny` shape, forward + backward + AdamW step, the two forms alternating
batch by batch.

    python bench/sft_step.py --threads 1 --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.chat import render_example  # noqa: E402
from neuraflux.data.sft import encode_example, make_sft_collate  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.stages.lm import lm_loss, masked_lm_loss  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402
from neuraflux.world import WorldConfig, generate_world  # noqa: E402
from neuraflux.world.tasks import sft_examples  # noqa: E402


def batches(batch_size: int, n: int, vocab: int):
    mix = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/world/default.yaml"))
    world = generate_world(WorldConfig.from_dict(mix, "conf/world/default.yaml"))
    examples = sft_examples(world)
    texts = ["".join(render_example(e.prompt, e.response, e.context)) for e in examples]
    tok = NanoTokenizer.train(texts, vocab_size=vocab)
    collate = make_sft_collate(tok.pad_id)
    records = [encode_example(tok, e.prompt, e.response, e.context, 257) for e in examples]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(records), generator=g).tolist()
    out = [collate([records[i] for i in order[k * batch_size : (k + 1) * batch_size]]) for k in range(n)]
    return out, tok.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=60, help="batches per form per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, vocab = batches(args.batch_size, args.steps, 2048)
    cfg = NanoConfig(
        vocab_size=2048, block_size=256, max_position_embeddings=512, n_layer=4, n_head=4, n_embd=128, dropout=0.0
    )
    forms = {
        "full logits": lambda m, b: lm_loss(m(b.input_ids, b.attention_mask), b.targets, b.loss_mask),
        "supervised positions": lambda m, b: masked_lm_loss(m, b.input_ids, b.targets, b.loss_mask, b.attention_mask),
    }
    models = {name: NanoLM(cfg) for name in forms}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    supervised = sum(int(b.loss_mask.sum()) for b in data) / sum(b.loss_mask.numel() for b in data)
    print(
        f"vocab {vocab} (trained), batch {args.batch_size}, "
        f"padded length {statistics.mean(b.input_ids.shape[1] for b in data):.0f}, "
        f"supervised share of positions {supervised:.3f}, threads {args.threads}"
    )
    ratios = []
    for r in range(args.rounds):
        spent = dict.fromkeys(forms, 0.0)
        for b in data:
            for name, loss_fn in forms.items() if r % 2 == 0 else reversed(list(forms.items())):
                t0 = time.perf_counter()
                loss = loss_fn(models[name], b)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                spent[name] += time.perf_counter() - t0
        ratios.append(spent["full logits"] / spent["supervised positions"])
        print(
            f"round {r}: "
            + ", ".join(f"{n} {1000 * s / len(data):.1f} ms/step" for n, s in spent.items())
            + f", speed-up {ratios[-1]:.2f}x"
        )
    print(f"median speed-up {statistics.median(ratios):.2f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()
