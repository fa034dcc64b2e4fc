"""What int8 quantization costs a trained model on the world: validation perplexity, exact match and the judges.

For a curriculum run (the directory `python train.py` writes), its final stage's model is evaluated in float32 and
quantized with each mode of model/quantize.py (int8 computed by its default fused kernels, and `int8-torchao`: int8
computed by torchao's own kernels, the reference):

- validation perplexity on the pretraining stage's validation tokens and on the SFT stage's validation answers
  (each stage's own data config, read from its config.yaml, split exactly as in training);
- `neuraflux.eval.evaluate`: exact match per entity split and the judges' mean.

Evaluation is greedy, so a float model gives the same answers every time; the noise that matters is which
questions happen to be asked: the binomial standard error of an exact-match score on that many questions is
printed beside the differences.

    python bench/quantize_quality.py --run outputs/world/<date>_<time> [--limit 0] [--threads 2] [--rows float32 int8]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neuraflux.curriculum import STATE_FILE  # noqa: E402
from neuraflux.eval import EvalSettings, evaluate, world_config_for  # noqa: E402
from neuraflux.model.io import load_for_inference, load_pretrained  # noqa: E402
from neuraflux.model.quantize import MODES, quantize_model  # noqa: E402
from neuraflux.stages.lm import masked_lm_loss  # noqa: E402
from neuraflux.world import generate_world  # noqa: E402

ROWS = ["float32", *MODES, "int8-torchao"]


def final_stage(run: Path) -> Path:
    import json

    stages = json.loads((run / STATE_FILE).read_text())["completed"]
    return run / stages[-1]


@torch.no_grad()
def perplexity(model, tokenizer, stage_dir: Path) -> float:
    """exp of the token-weighted mean loss over the stage's validation batches."""
    from omegaconf import OmegaConf

    from neuraflux.train import build

    cfg = OmegaConf.load(stage_dir / "config.yaml")
    datamodule = build(cfg.data, key="data")
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    total, count = 0.0, 0
    for batch in datamodule.val_dataloader():
        n = int(batch.loss_mask.sum())
        loss = masked_lm_loss(model, batch.input_ids, batch.targets, batch.loss_mask, batch.attention_mask)
        total += float(loss) * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def compiled_step_error(model, tokenizer, text: str, prefill: int = 8) -> tuple[float, float]:
    """Max |logit difference| to the uncached forward, teacher-forced over `text`, of the eager static decode step
    and of its torch.compile'd form (model/generation.py)."""
    from neuraflux.model.generation import compiled_decode_step, static_decode_step
    from neuraflux.model.nano import KVCache

    ids = torch.tensor([tokenizer.encode(text)])
    want = model(ids)[:, prefill - 1 : -1]
    errors = []
    for step in (static_decode_step, compiled_decode_step()):
        cache = KVCache.slots(model.config, 1, 128, "cpu", torch.float32)
        out = [model.lm_head(model.transformer(ids[:, :prefill], kv_cache=cache)[:, -1])]
        for t in range(prefill, ids.shape[1] - 1):
            out.append(step(model, ids[:, t : t + 1], cache.positions, cache.keys, cache.values))
            cache.positions += 1
        errors.append((torch.stack(out, 1) - want).abs().max().item())
    return errors[0], errors[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a curriculum run directory (its curriculum.json)")
    p.add_argument("--limit", type=int, default=0, help="questions per split; 0 = all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="float32 is always measured (the baseline)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = final_stage(args.run)
    world = generate_world(world_config_for(model_dir))
    rows, step_errors = {}, {}
    for name in ["float32", *[r for r in ROWS if r in args.rows and r != "float32"]]:
        if name == "int8-torchao":
            model, tokenizer = load_pretrained(model_dir)
            quantize_model(model.eval(), "int8", kernel="torchao")
        else:
            model, tokenizer = load_for_inference(model_dir, None if name == "float32" else name)
        step_errors[name] = compiled_step_error(model, tokenizer, world.retrieval_documents()[0].text)
        ppl = {stage: perplexity(model, tokenizer, args.run / stage) for stage in ("pretrain", "sft")}
        result = evaluate(model, tokenizer, world, EvalSettings(limit=args.limit))
        judges = sum(result["judges"].values()) / len(result["judges"])
        rows[name] = (ppl, result, judges)
    print(f"model: {model_dir}  (threads {args.threads}, limit {args.limit or 'all'})")
    base_ppl, base, base_judges = rows["float32"]
    header = "mode          pretrain ppl (rel)   sft ppl (rel)     EM seen  EM unseen  judges mean"
    print(header)
    for name, (ppl, result, judges) in rows.items():
        rel = {k: ppl[k] / base_ppl[k] - 1 for k in ppl}
        em = result["exact_match"]
        print(
            f"{name:13s} {ppl['pretrain']:7.4f} ({rel['pretrain']:+.2%})  {ppl['sft']:7.4f} ({rel['sft']:+.2%})  "
            f"{em['seen']['with_retrieval']:.3f}    {em['unseen']['with_retrieval']:.3f}      {judges:.4f}"
        )
    for name, (eager, compiled) in step_errors.items():
        print(f"{name}: max |logit - uncached forward|, static decode step: eager {eager:.2g}, compiled {compiled:.2g}")
    n = base["n"]["unseen"]
    p_unseen = base["exact_match"]["unseen"]["with_retrieval"]
    print(f"binomial standard error of exact match on {n} questions at {p_unseen:.2f}: "
          f"{math.sqrt(p_unseen * (1 - p_unseen) / n):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
