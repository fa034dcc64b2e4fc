"""What DPO costs over SFT: tokens/s of a DPO step with precomputed reference log-probs against an SFT step on the
SAME sequences (same model shape, same (2B, T) batches of world preference pairs, same optimizer).

Every variant runs forward, loss, backward, gradient clipping and an AdamW step on its own copy of one initial
model. Variants are interleaved, their order rotating each repetition, so all see the same machine load;
tokens/s = padded tokens per step (2B * T) / step time after one warm-up step. Ratio = median DPO / median SFT.

  dpo       NanoDPO.dpo_step, reference log-probs precomputed once (target: >= 0.9x sft)
  sft       masked_lm_loss on the response tokens (the SFT stage's loss: head at response positions only), the
            same forward as dpo (right padded, so no padding mask)
  sft_mask  the same with the padding mask passed to the model, as the SFT stage runs a padded batch
  dpo_ref   NanoDPO.dpo_step with a reference forward per batch, for scale

    python bench/alignment_dpo_cost.py --threads 1 --reps 3 --steps 20
    python bench/alignment_dpo_cost.py --shape small --threads 2 --reps 5 --steps 30
    python bench/alignment_dpo_cost.py --shape small --device cuda --reps 5 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuraflux.data.preference_batches import PreferenceBatch, PreferenceDataModule  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM  # noqa: E402
from neuraflux.optim import OptimizerFactory  # noqa: E402
from neuraflux.stages.dpo import NanoDPO  # noqa: E402
from neuraflux.stages.lm import masked_lm_loss  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

SHAPES = {
    # the test suite's tiny model, and conf/model/tiny.yaml
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, max_length=64, vocab=512, pairs=8),
    "small": dict(n_layer=4, n_head=4, n_embd=128, max_length=128, vocab=2048, pairs=8),
}
VARIANTS = ("dpo", "sft", "sft_mask", "dpo_ref")


@dataclass
class Variant:
    name: str
    loss: Callable[[PreferenceBatch], torch.Tensor]
    model: NanoLM
    optimizer: torch.optim.Optimizer


def build(shape: str, device: torch.device) -> tuple[list[PreferenceBatch], dict[str, Variant], float]:
    """Batches, the four variants, and the seconds precomputing the reference log-probs took."""
    s = SHAPES[shape]
    dm = PreferenceDataModule(
        builtin="world", world={"n_entities": 60}, batch_size=s["pairs"], max_length=s["max_length"]
    )
    dm.tokenizer = NanoTokenizer.train(dm.texts(), vocab_size=s["vocab"])
    dm.setup()
    batches = [dm.transfer_batch_to_device(b, device, 0) for b in dm.sequential_loader("train")]
    config = NanoConfig(
        vocab_size=s["vocab"],
        block_size=s["max_length"],
        max_position_embeddings=s["max_length"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        n_embd=s["n_embd"],
    )
    torch.manual_seed(0)
    initial = NanoLM(config).to(device).train()

    def stage(precompute: bool) -> tuple[NanoDPO, float]:
        module = NanoDPO(copy.deepcopy(initial), dm.tokenizer, OptimizerFactory(), precompute_ref_logps=precompute)
        module.to(device)
        t0 = time.perf_counter()
        if precompute:
            module.precompute(dm)
        return module, time.perf_counter() - t0

    dpo, precompute_s = stage(precompute=True)
    dpo_ref, _ = stage(precompute=False)
    sft_model, sft_mask_model = copy.deepcopy(initial), copy.deepcopy(initial)
    losses: dict[str, tuple[Callable[[PreferenceBatch], torch.Tensor], NanoLM]] = {
        "dpo": (lambda b: dpo.dpo_step(b, "train").loss, dpo.model),
        "sft": (lambda b: masked_lm_loss(sft_model, b.input_ids, b.targets, b.response_mask), sft_model),
        "sft_mask": (
            lambda b: masked_lm_loss(sft_mask_model, b.input_ids, b.targets, b.response_mask, b.attention_mask),
            sft_mask_model,
        ),
        "dpo_ref": (lambda b: dpo_ref.dpo_step(b, "train").loss, dpo_ref.model),
    }
    variants = {}
    for name, (loss, model) in losses.items():
        optimizer, _ = OptimizerFactory(lr=1e-4, warmup_steps=0)(model.named_parameters(), total_steps=10_000)
        variants[name] = Variant(name, loss, model, optimizer)
    return batches, variants, precompute_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(v: Variant, batches: list[PreferenceBatch], steps: int, device: torch.device) -> float:
    """tokens/s over `steps` training steps after one warm-up step."""
    tokens, start = 0, None
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        loss = v.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
        if i >= 1:
            tokens += batch.input_ids.numel()
    sync(device)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches, variants, precompute_s = build(args.shape, device)
    pairs = sum(b.num_pairs for b in batches)
    print(
        f"shape={args.shape} device={device} torch threads={torch.get_num_threads()} reps={args.reps} "
        f"steps/rep={args.steps} batch={batches[0].num_pairs} pairs = {batches[0].input_ids.shape[0]} sequences, "
        f"{len(batches)} distinct batches; reference log-probs of {pairs} pairs precomputed in {precompute_s:.2f} s"
    )
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            results[name].append(measure(variants[name], batches, args.steps, device))
        print(f"rep {rep}: " + ", ".join(f"{n} {results[n][-1]:.0f}" for n in VARIANTS) + " tokens/s")
    med = {n: statistics.median(r) for n, r in results.items()}
    print("median tokens/s: " + ", ".join(f"{n} {med[n]:.0f}" for n in VARIANTS))
    print(f"ratio dpo / sft (same forward)         = {med['dpo'] / med['sft']:.3f}   (target >= 0.9)")
    print(f"ratio dpo / sft_mask (SFT stage's way) = {med['dpo'] / med['sft_mask']:.3f}")
    print(f"ratio dpo_ref / sft                    = {med['dpo_ref'] / med['sft']:.3f}")


if __name__ == "__main__":
    main()
