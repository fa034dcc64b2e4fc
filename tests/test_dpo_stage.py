"""stage=dpo: log 2 at the start, precomputed = per-batch reference log-probs, margins rise, the reference stays
frozen and out of optimizer and checkpoint, the log-probs match an unpadded forward, resume reloads the reference."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.data.preference_batches import PreferenceDataModule
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.dpo import NanoDPO
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.conftest import compose_cfg
from tests.test_train import scalar_tags

STEPS = 6
# plain DPO (the stage default adds RPO's NLL term, tested on its own below): its first loss is exactly log 2
RUN = [
    "stage=dpo",
    "optim.lr=3e-3",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "stage.module.rpo_alpha=null",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A ~30k-parameter model runs fastest on one thread; two threads spin against each other on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """An untrained policy with the tiny config's shapes and a BPE tokenizer of the world pairs: stage.init_from."""
    tmp = tmp_path_factory.mktemp("init")
    cfg = compose_cfg(tmp, "stage=dpo")
    dm = PreferenceDataModule(builtin="world", world=OmegaConf.to_container(cfg.world, resolve=True))
    tokenizer = NanoTokenizer.train(dm.texts(), vocab_size=cfg.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = NanoLM(NanoConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    model.save_pretrained(tmp / "model")
    tokenizer.save(tmp / "model" / "tokenizer.json")
    return tmp / "model"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, init_dir):
    """The same DPO run twice: reference log-probs per batch, and precomputed once."""
    out = {}
    for precompute in (False, True):
        tmp = tmp_path_factory.mktemp(f"dpo_{precompute}")
        cfg = compose_cfg(tmp, *RUN, f"stage.init_from={init_dir}", f"stage.module.precompute_ref_logps={precompute}")
        metrics, objects = train(cfg)
        out[precompute] = {"metrics": metrics, "tags": scalar_tags(objects["run_dir"]), **objects}
    return out


def test_first_loss_is_log2_and_precomputed_matches_per_batch(runs):
    per_batch, precomputed = runs[False]["tags"], runs[True]["tags"]
    # policy == reference at step 0: every log-ratio is 0 and -log sigmoid(0) = log 2
    assert per_batch["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert per_batch["rewards/margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert len(per_batch["train/loss"]) == STEPS
    # the precomputed table holds the same numbers as the per-batch forward (other padding, same tokens)
    assert precomputed["train/loss"] == pytest.approx(per_batch["train/loss"], abs=1e-5)
    assert precomputed["val/loss"] == pytest.approx(per_batch["val/loss"], abs=1e-5)
    module = runs[True]["module"]
    assert module.reference is None  # dropped after precomputing
    assert {k: len(v.chosen) for k, v in module.precomputed.items()} == {"train": 153, "val": 27}
    assert all(
        bool(torch.isfinite(t.chosen).all() and torch.isfinite(t.rejected).all()) for t in module.precomputed.values()
    )


def test_a_few_steps_raise_the_margins(runs):
    tags, metrics = runs[False]["tags"], runs[False]["metrics"]
    # measured: train-batch margins 0 -> 0.63, val margin 0.50 and accuracy 0.69 (16 pairs) after 6 steps at lr 3e-3
    assert tags["rewards/margins"][-1] > 0.3
    assert metrics["val/margins"] > 0.25 and metrics["val/accuracies"] > 0.6
    for tag in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "val/loss",
        "train/grad_norm",
    ):
        assert tag in tags, tag


def test_reference_stays_frozen_out_of_the_optimizer_and_out_of_the_checkpoint(runs, init_dir):
    module, run_dir = runs[False]["module"], runs[False]["run_dir"]
    initial = NanoLM.from_pretrained(init_dir).state_dict()
    reference = module.reference
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    moved = [n for n, p in module.model.state_dict().items() if not torch.equal(p, initial[n])]
    assert moved, "the policy should have trained"

    optimizer = module.optimizers().optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()}
    assert not in_optimizer & {id(p) for p in reference.parameters()}

    policy_keys = {f"model.{k}" for k in module.model.state_dict()}
    assert set(module.state_dict()) == policy_keys
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == policy_keys
    assert ckpt["neuraflux"]["reference_from"] == str(init_dir)


def test_sequence_logps_equal_an_unpadded_forward(runs):
    module = runs[False]["module"]
    batch = next(iter(runs[False]["trainer"].datamodule.sequential_loader("val")))
    got = module.reference_logps(batch, "val")  # (B,) each, from the stacked right-padded forward
    ref = module.reference
    for row in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :n]
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids[None])[0, :-1].float(), dim=-1)  # (n - 1, V), predicts ids[1:]
        per_token = logp.gather(-1, ids[1:, None]).squeeze(-1)
        start = int(batch.response_mask[row].nonzero()[0])  # first position whose target is a response token
        expected = per_token[start:].sum()  # the response runs to the end of the sequence
        half = got.chosen if row < batch.num_pairs else got.rejected
        assert half[row % batch.num_pairs].item() == pytest.approx(expected.item(), abs=1e-4)


def _first_batch(init_dir):
    """The init policy, its tokenizer and the first 4 training pairs of a 20-entity world."""
    model, tokenizer = NanoLM.from_pretrained(init_dir), NanoTokenizer.load(init_dir)
    dm = PreferenceDataModule(builtin="world", world={"n_entities": 20}, batch_size=4, max_length=64)
    dm.tokenizer = tokenizer
    dm.setup()
    return model, tokenizer, next(iter(dm.sequential_loader("train")))


def test_loss_types_at_step_zero_and_settings_checked_first(init_dir):
    model, tokenizer, batch = _first_batch(init_dir)
    # h = 0 when policy == reference: sigmoid -log sigma(0) = log 2, hinge relu(1 - 0) = 1,
    # ipo (0 - 1 / (2 beta))^2 = 1 / (4 beta^2) = 25 at beta 0.1
    for loss_type, expected in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 25.0)):
        stage = NanoDPO(model, tokenizer, OptimizerFactory(), beta=0.1, loss_type=loss_type, rpo_alpha=None)
        assert stage.dpo_step(batch, "train").loss.item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"^stage.module: dpo beta must be > 0, got 0"):
        NanoDPO(model, tokenizer, OptimizerFactory(), beta=0)
    with pytest.raises(ValueError, match=r"^stage.module: dpo loss_type must be one of"):
        NanoDPO(model, tokenizer, OptimizerFactory(), loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing only applies to 'sigmoid' and 'robust', not 'hinge'"):
        NanoDPO(model, tokenizer, OptimizerFactory(), loss_type="hinge", label_smoothing=0.1)


def test_rpo_adds_the_chosen_per_token_nll_worked_out_by_hand(init_dir):
    from neuraflux.alignment.losses import token_logprobs

    model, tokenizer, batch = _first_batch(init_dir)
    # the chosen rows' token log-probs from a full forward: NLL = -(sum over chosen response tokens) / their count
    with torch.no_grad():
        per_token = token_logprobs(model(batch.chosen_ids), batch.targets[: batch.num_pairs])
    mask = batch.chosen_response_mask
    nll = -(per_token * mask).sum() / mask.sum()
    for loss_type in ("sigmoid", "ipo"):  # ipo averages log-probs per sequence; the NLL is still per token
        plain = NanoDPO(model, tokenizer, OptimizerFactory(), loss_type=loss_type, rpo_alpha=None).dpo_step(
            batch, "train"
        )
        rpo = NanoDPO(model, tokenizer, OptimizerFactory(), loss_type=loss_type, rpo_alpha=0.5).dpo_step(batch, "train")
        assert plain.nll is None and rpo.nll.item() == pytest.approx(nll.item(), rel=1e-5)
        assert rpo.loss.item() == pytest.approx(plain.loss.item() + 0.5 * nll.item(), rel=1e-5)
    with pytest.raises(ValueError, match="stage.module.rpo_alpha must be >= 0 or null, got -1"):
        NanoDPO(model, tokenizer, OptimizerFactory(), rpo_alpha=-1.0)


def test_resume_without_reference_source_is_refused(init_dir):
    stage = NanoDPO(NanoLM.from_pretrained(init_dir), NanoTokenizer.load(init_dir), OptimizerFactory())
    with pytest.raises(ValueError, match="resuming DPO needs stage.module.reference_from"):
        stage.on_load_checkpoint({"rng": None})


def test_resume_reference_with_another_tokenizer_is_refused(init_dir, tmp_path):
    other = NanoTokenizer.train(["just some other text"], vocab_size=0, mode="char")
    NanoLM.from_pretrained(init_dir).save_pretrained(tmp_path / "m")
    other.save(tmp_path / "m" / "tokenizer.json")
    stage = NanoDPO(
        NanoLM.from_pretrained(init_dir),
        NanoTokenizer.load(init_dir),
        OptimizerFactory(),
        reference_from=str(tmp_path / "m"),
    )
    with pytest.raises(ValueError, match=r"stage.module.reference_from=.*/m: its tokenizer \(fingerprint"):
        stage.on_load_checkpoint({"rng": None})


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_reloads_the_reference_and_matches_an_uninterrupted_run(tiny_cfg, tmp_path, init_dir, precompute):
    # precomputed (the default): the resumed run recomputes the table from the reloaded reference, then drops it
    common = [
        "stage=dpo",
        f"stage.init_from={init_dir}",
        "optim.total_steps=8",
        "trainer.val_check_interval=4",
        f"stage.module.precompute_ref_logps={precompute}",
    ]
    _, straight = train(tiny_cfg(*common, "trainer.max_steps=8", f"paths.run_dir={tmp_path / 'a'}"))
    train(tiny_cfg(*common, "trainer.max_steps=4", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(
        tiny_cfg(*common, "trainer.max_steps=8", f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}")
    )
    if precompute:
        assert resumed["module"].reference is None
        for split, table in straight["module"].precomputed.items():
            torch.testing.assert_close(resumed["module"].precomputed[split].chosen, table.chosen, atol=0, rtol=0)
    else:
        initial = NanoLM.from_pretrained(init_dir).state_dict()
        for name, tensor in resumed["module"].reference.state_dict().items():
            torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    for (name, a), (_, b) in zip(straight["model"].named_parameters(), resumed["model"].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
