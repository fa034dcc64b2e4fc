"""stage=kto: the KTO loss worked by hand and against TRL's, unpaired data from the world and from TRL-shaped files
(bad records refused in one line naming file and line), the mismatched pairs of a batch, and the stage: its first
loss, what a few steps measurably do, and a reference that stays frozen and out of optimizer and checkpoint."""

from __future__ import annotations

import json
import math
import re
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from neuraflux.alignment import kto_loss, kto_reference_point
from neuraflux.alignment.losses import response_logprobs
from neuraflux.chat import ESCAPE, render_prompt
from neuraflux.data.preference_batches import PreferenceDataModule
from neuraflux.data.unpaired import UnpairedExample, read_unpaired_jsonl, unpair
from neuraflux.data.unpaired_batches import UnpairedDataModule, collate_unpaired, encode_examples
from neuraflux.model import NanoLM
from neuraflux.optim import OptimizerFactory
from neuraflux.stages.kto import NanoKTO
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.conftest import compose_cfg
from tests.test_dpo_stage import init_dir  # noqa: F401  (the fixture: an untrained policy with a world tokenizer)
from tests.test_train import scalar_tags

STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A ~40k-parameter model runs fastest on one thread; two threads spin against each other on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(*xs, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def b(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.bool)


# ---------------------------------------------------------------- the loss, by hand


def test_policy_equal_to_reference_gives_half_of_each_weight():
    # r = 0 and z0 = 0: every sigmoid argument is 0 and each loss is weight * (1 - sigmoid(0)) = weight * 0.5
    zero = torch.zeros(4, dtype=torch.float64)
    out = kto_loss(zero, zero, b(True, False, True, False), torch.tensor(0.0), 0.1, 1.0, 2.0)
    torch.testing.assert_close(out.losses, t(0.5, 1.0, 0.5, 1.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.rewards, torch.zeros_like(zero), atol=0, rtol=0)
    assert out.reference_point.item() == 0.0


def test_a_worked_batch():
    # beta 0.5, z0 0.4; policy - reference = -1 - (-2) = 1 (desirable) and -3 - (-2) = -1 (undesirable)
    # desirable:   1 * (1 - sigmoid(0.5 * (1 - 0.4)))    = 1 - sigmoid(0.3) = 1 - 0.5744425168 = 0.4255574832
    # undesirable: 1.5 * (1 - sigmoid(0.5 * (0.4 + 1))) = 1.5 * (1 - sigmoid(0.7)) = 1.5 * 0.3318122278
    #              = 0.4977183417
    # rewards: beta * r = 0.5 and -0.5
    out = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), b(True, False), torch.tensor(0.4, dtype=torch.float64), 0.5, 1.0, 1.5)
    torch.testing.assert_close(out.losses, t(0.4255574832, 0.4977183417), atol=1e-9, rtol=0)
    torch.testing.assert_close(out.rewards, t(0.5, -0.5), atol=1e-12, rtol=0)


def test_reference_point_is_the_floored_detached_mean_of_the_mismatched_log_ratios():
    # log-ratios 1, 0.5, 0: mean 0.5; log-ratios 1, 0, -2: mean -1/3, floored at 0 (a KL is not negative)
    policy = t(-1.0, -1.5, -2.0).requires_grad_()
    assert kto_reference_point(policy, t(-2.0, -2.0, -2.0)).item() == pytest.approx(0.5, abs=1e-12)
    assert kto_reference_point(t(-1.0, -2.0, -4.0), t(-2.0, -2.0, -2.0)).item() == 0.0
    assert not kto_reference_point(policy, t(-2.0, -2.0, -2.0)).requires_grad
    with pytest.raises(ValueError, match="no mismatched pairs"):
        kto_reference_point(torch.zeros(0), torch.zeros(0))


def test_gradients_reach_the_policy_only_and_have_the_sign_of_the_label():
    # d/dr of w (1 - sigmoid(beta (r - z0))) at r = z0 = 0 is -w beta sigmoid(0) (1 - sigmoid(0)) = -w beta / 4:
    # -1 * 0.1 / 4 = -0.025 for a desirable example; an undesirable one has +w beta / 4 = +2 * 0.1 / 4 = +0.05
    policy = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    reference = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    kl_policy = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # z0 built from a graph: still detached
    z0 = kto_reference_point(kl_policy, torch.zeros(2, dtype=torch.float64))
    kto_loss(policy, reference, b(True, False), z0, 0.1, 1.0, 2.0).losses.sum().backward()
    torch.testing.assert_close(policy.grad, t(-0.025, 0.05), atol=1e-12, rtol=0)
    assert reference.grad is None and kl_policy.grad is None


def test_bad_settings_and_inputs_are_refused_naming_them():
    z, one = torch.zeros(2), torch.tensor(0.0)
    with pytest.raises(ValueError, match="kto beta must be > 0, got 0"):
        kto_loss(z, z, b(True, False), one, beta=0)
    with pytest.raises(ValueError, match="kto undesirable_weight must be > 0, got -1"):
        kto_loss(z, z, b(True, False), one, undesirable_weight=-1)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        kto_loss(z, z, torch.ones(2), one)
    with pytest.raises(ValueError, match=r"ref_logps has shape \(3,\) but policy_logps has shape \(2,\)"):
        kto_loss(z, torch.zeros(3), b(True, False), one)
    with pytest.raises(ValueError, match="reference_point must be a scalar"):
        kto_loss(z, z, b(True, False), torch.zeros(1))


# ---------------------------------------------------------------- against TRL's KTO loss


def trl_kto_loss_literal(policy, reference, labels, policy_kl, reference_kl, beta, w_d, w_u):
    """TRL 1.16's KTOTrainer._compute_loss (loss_type "kto"), its loss lines transcribed one for one: the examples
    split by label with index_select, z0 = mean(KL log-ratios).detach() clamped at 0, then
    cat(w_D * chosen_losses, w_U * rejected_losses).nanmean()."""
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logps, rejected_logps = policy.index_select(0, chosen_idx), policy.index_select(0, rejected_idx)
    ref_chosen, ref_rejected = reference.index_select(0, chosen_idx), reference.index_select(0, rejected_idx)
    kl = (policy_kl - reference_kl).mean().detach().mean().clamp(min=0)
    chosen_losses = 1 - F.sigmoid(beta * ((chosen_logps - ref_chosen) - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - (rejected_logps - ref_rejected)))
    return torch.cat((w_d * chosen_losses, w_u * rejected_losses), 0).nanmean(), kl


def random_batch(seed: int, kl_shift: float, n: int = 12):
    """Random sequence log-probs; the mismatched pairs' log-ratios are kl_shift + U(-2, 2), so z0 is about
    max(0, kl_shift)."""
    g = torch.Generator().manual_seed(seed)
    policy, reference = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
    reference_kl = -20 * torch.rand(n, generator=g)
    policy_kl = reference_kl + kl_shift + 4 * torch.rand(n, generator=g) - 2
    labels = torch.rand(n, generator=g) < 0.5
    labels[0], labels[1] = True, False  # both classes present
    return policy, reference, labels, policy_kl, reference_kl


@pytest.mark.parametrize("seed, kl_shift", [(0, -3.0), (1, 0.0), (2, 1.0), (3, 3.0)])
def test_our_loss_equals_trls_formula_on_random_batches(seed, kl_shift):
    policy, reference, labels, policy_kl, reference_kl = random_batch(seed, kl_shift)
    beta, w_d, w_u = 0.1 + seed * 0.3, 1.0, 1.33
    expected, kl = trl_kto_loss_literal(policy, reference, labels, policy_kl, reference_kl, beta, w_d, w_u)
    out = kto_loss(policy, reference, labels, kto_reference_point(policy_kl, reference_kl), beta, w_d, w_u)
    assert out.losses.mean().item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.reference_point.item() == pytest.approx(kl.item(), abs=1e-6)
    assert (kl.item() == 0.0) == (kl_shift < 0)  # the floor at 0 is exercised, and z0 > 0 too


def test_our_loss_equals_trls_kto_trainer_on_the_same_log_probs():
    """TRL's own code: KTOTrainer._compute_loss run on a stand-in trainer and model that hand it chosen sequence
    log-probs (its precompute_ref_log_probs path, where the reference log-probs come with the batch). TRL 1.16 has
    no standalone KTO loss function; the loss is computed inside this method."""
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    if not hasattr(KTOTrainer, "_compute_kl_logps"):
        pytest.skip("this TRL's KTOTrainer computes its loss elsewhere (written against TRL 1.16)")
    for kl_shift in (1.0, -3.0):  # z0 > 0, and z0 floored at 0
        check_against_trl(KTOTrainer, *random_batch(7, kl_shift), beta=0.3, w_d=1.0, w_u=1.33)


def check_against_trl(KTOTrainer, policy, reference, labels, policy_kl, reference_kl, beta, w_d, w_u):
    n = len(policy)
    # two-token sequences: TRL sums the log-probs of positions 1.. of each row, here the one position, so a row's
    # sequence log-prob is exactly the value we choose; the KL rows are told apart by their token ids
    inputs = {
        "input_ids": torch.zeros(n, 2, dtype=torch.long),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.ones(n, 2, dtype=torch.long),
        "KL_input_ids": torch.ones(n, 2, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, 2, dtype=torch.long),
        "KL_completion_mask": torch.ones(n, 2, dtype=torch.long),
        "label": labels,
        "ref_logps": reference,
        "ref_KL_logps": reference_kl,
    }

    def model(input_ids, **kwargs):
        logps = policy_kl if bool((input_ids == 1).all()) else policy
        zeros = torch.zeros(n, 1)
        return types.SimpleNamespace(log_probs=logps[:, None], entropy=zeros, mean_logits=zeros)

    model.training = True
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
        beta=beta, desirable_weight=w_d, undesirable_weight=w_u, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    expected = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)

    out = kto_loss(policy, reference, labels, kto_reference_point(policy_kl, reference_kl), beta, w_d, w_u)
    assert out.losses.mean().item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.reference_point.item() == pytest.approx(trainer._metrics["train"]["kl"][0], abs=1e-6)
    for name, rows in (("chosen", labels), ("rejected", ~labels)):
        assert out.rewards[rows].mean().item() == pytest.approx(trainer._metrics["train"][f"rewards/{name}"][0])


# ---------------------------------------------------------------- data


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_trl_unpaired_records_plain_and_conversational(tmp_path):
    path = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "What is <|eos|> here?", "completion": " A token. ", "label": True},
            {
                "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "name a colour"}],
                "completion": [{"role": "assistant", "content": "blue"}],
                "label": False,
            },
            {"messages": [{"role": "user", "content": "q"}], "completion": "a", "label": True, "context": "doc"},
        ],
    )  # fmt: skip
    first, second, third = read_unpaired_jsonl(path)

    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    # user text is escaped, so the special-token string in it never becomes the token
    assert first == UnpairedExample(render_prompt([user("What is <|eos|> here?")]), "A token.", True)
    assert f"<{ESCAPE}|eos|>" in first.prompt
    turns = [user("hi"), {"role": "assistant", "content": "hello"}, user("name a colour")]
    assert second == UnpairedExample(render_prompt(turns), "blue", False)
    assert third == UnpairedExample(render_prompt([user("q")], context="doc"), "a", True)


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label' must be true \\(desirable\\) or false "
         '\\(undesirable\\), got "yes"'),
        ({"prompt": "q", "completion": "a", "label": 1}, "field 'label' must be true .* got 1"),
        ({"prompt": "q", "completion": "a"}, "field 'label' must be true .* got missing"),
        ({"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True},
         "field 'completion' must be a string or a list of one {'role': 'assistant', 'content'} turn"),
        ({"prompt": "q", "completion": "  ", "label": True}, "field 'completion' must be a non-empty string"),
        ({"prompt": "<|bos|><|user|>q<|end|><|assistant|>", "completion": "a", "label": True},
         "field 'prompt' is a rendered chat prompt"),
    ],
)  # fmt: skip
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, record, reason):
    good = {"prompt": "fine", "completion": "ok", "label": False}
    path = write_jsonl(tmp_path / "kto.jsonl", [good, "", record, good])  # line 2 is blank: still counted
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/kto.jsonl, line 3: {reason}") as err:
        read_unpaired_jsonl(path)
    assert "\n" not in str(err.value)
    assert len(read_unpaired_jsonl(path, on_invalid="skip")) == 2


def test_unreadable_files_are_refused_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_unpaired_jsonl(tmp_path / "missing.jsonl")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "q", "completion": "a", "label": True}, '{"x": 1'])
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: not valid JSON"):
        read_unpaired_jsonl(broken)
    with pytest.raises(ValueError, match=r"unpaired files must end with one of"):
        read_unpaired_jsonl(write_jsonl(tmp_path / "kto.json", [{}]))


def test_the_data_module_reads_a_file_and_splits_it_by_prompt(tmp_path):
    rows = [{"prompt": f"q{i // 2}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(40)]
    dm = UnpairedDataModule(path=write_jsonl(tmp_path / "kto.jsonl", rows), val_fraction=0.25, seed=0)
    train_prompts = {e.prompt for e in dm.examples["train"]}
    val_prompts = {e.prompt for e in dm.examples["val"]}
    assert len(dm.examples["train"]) + len(dm.examples["val"]) == 40
    assert val_prompts and not train_prompts & val_prompts  # whole prompts held out


def test_the_worlds_pairs_unpair_and_hold_out_the_prompts_dpo_holds_out():
    world = {"n_entities": 20}
    kto = UnpairedDataModule(builtin="world", world=world)
    dpo = PreferenceDataModule(builtin="world", world=world)
    dpo.tokenizer = NanoTokenizer.train(dpo.texts(), vocab_size=0, mode="char")
    dpo.setup()
    for split in ("train", "val"):
        # each pair is two examples under its prompt: the chosen response desirable, the rejected undesirable
        assert kto.examples[split] == unpair(dpo.examples[split])
    assert sum(e.desirable for e in kto.examples["train"]) * 2 == len(kto.examples["train"])


def test_a_batch_pairs_each_prompt_with_the_previous_examples_completion():
    tokenizer = NanoTokenizer.train(["abcdefghij xyz <>"], vocab_size=0, mode="char")
    examples = [UnpairedExample(render_prompt([{"role": "user", "content": q}]), a, d)
                for q, a, d in (("a", "xx", True), ("bb", "y", False), ("c", "zzz", True))]  # fmt: skip
    encoded = encode_examples(tokenizer, examples)
    batch = collate_unpaired(encoded, tokenizer.pad_id, max_length=64)
    assert batch.input_ids.shape[0] == 6 and batch.desirable.tolist() == [True, False, True]

    def text(row: int, response: bool) -> str:
        ids = batch.input_ids[row]
        targets = batch.targets[row][batch.response_mask[row]]  # the response tokens, as next-token targets
        prompt_len = int(batch.attention_mask[row].sum()) - len(targets)
        return tokenizer.decode((targets if response else ids[:prompt_len]).tolist(), skip_special_tokens=True)

    # rows 3, 4, 5: prompt i with the completion of example i - 1 (the last example's for the first)
    assert [text(3 + i, False) for i in range(3)] == [text(i, False) for i in range(3)]
    assert [text(3 + i, True) for i in range(3)] == [text(2, True), text(0, True), text(1, True)]
    assert [text(i, True) for i in range(3)] == ["xx", "y", "zzz"]


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def run(tmp_path_factory, init_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("kto")
    cfg = compose_cfg(
        tmp, "stage=kto", "optim.lr=3e-3", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
        f"stage.init_from={init_dir}",
    )  # fmt: skip
    metrics, objects = train(cfg)
    return {"metrics": metrics, "tags": scalar_tags(objects["run_dir"]), **objects}


def test_first_loss_is_half_and_the_metrics_are_logged(run):
    tags = run["tags"]
    # policy == reference at step 0: r = 0, z0 = 0, each example's loss is 1 * (1 - sigmoid(0)) = 0.5
    assert tags["train/loss"][0] == pytest.approx(0.5, abs=1e-6)
    assert tags["train/kl_ref"][0] == 0.0 and tags["rewards/margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert len(tags["train/loss"]) == STEPS
    for tag in ("rewards/desirable", "rewards/undesirable", "logps/desirable", "logps/undesirable", "val/loss",
                "val/kl_ref", "val/margins", "train/grad_norm"):  # fmt: skip
        assert tag in tags, tag


def test_a_few_steps_move_desirable_log_ratios_above_the_reference_point_and_undesirable_below(run):
    # on the 54 held-out examples (27 world pairs), after 6 steps at lr 3e-3 from an untrained policy: every
    # log-ratio rises (the policy learns the chat format) and the reference point z0 with them (asserted > 3); the
    # desirable completions' mean log-ratio ends more than 1 above it and the undesirable ones' more than 1 below
    module, dm = run["module"], run["trainer"].datamodule
    module.eval()
    batches = torch.utils.data.DataLoader(dm.val_set, batch_size=16, collate_fn=dm.collate)
    ratios, mismatched, desirable = [], [], []
    with torch.no_grad():
        for batch in batches:
            args = batch.input_ids, batch.targets, batch.response_mask
            ratio = response_logprobs(module.model, *args) - response_logprobs(module.reference, *args)
            ratios.append(ratio[: batch.num_examples])
            mismatched.append(ratio[batch.num_examples :])
            desirable.append(batch.desirable)
    ratio, desirable = torch.cat(ratios), torch.cat(desirable)
    z0 = torch.cat(mismatched).mean()
    assert len(ratio) == 54 and int(desirable.sum()) == 27
    assert z0 > 3.0
    assert ratio[desirable].mean() - z0 > 1.0
    assert ratio[~desirable].mean() - z0 < -1.0


def test_reference_stays_frozen_out_of_the_optimizer_and_out_of_the_checkpoint(run, init_dir):  # noqa: F811
    module, run_dir = run["module"], run["run_dir"]
    initial = NanoLM.from_pretrained(init_dir).state_dict()
    reference = module.reference
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(p, initial[n]) for n, p in module.model.state_dict().items()), "the policy trained"

    optimizer = module.optimizers().optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()}

    policy_keys = {f"model.{k}" for k in module.model.state_dict()}
    assert set(module.state_dict()) == policy_keys
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == policy_keys
    assert ckpt["neuraflux"]["reference_from"] == str(init_dir)


def test_resume_reloads_the_reference_from_where_the_run_started(init_dir):  # noqa: F811
    policy, tokenizer = NanoLM.from_pretrained(init_dir), NanoTokenizer.load(init_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # a policy that has moved, as one restored from a checkpoint has
    stage = NanoKTO(policy, tokenizer, OptimizerFactory(), reference_from=str(init_dir))
    stage.on_load_checkpoint({})
    initial = NanoLM.from_pretrained(init_dir).state_dict()
    for name, tensor in stage.reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    assert all(not p.requires_grad for p in stage.reference.parameters()) and not stage.reference.training
    with pytest.raises(ValueError, match="resuming KTO needs stage.module.reference_from"):
        NanoKTO(policy, tokenizer, OptimizerFactory()).on_load_checkpoint({})


def test_settings_are_checked_when_the_stage_is_built(init_dir):  # noqa: F811
    model, tokenizer = NanoLM.from_pretrained(init_dir), NanoTokenizer.load(init_dir)
    with pytest.raises(ValueError, match=r"^stage.module: kto beta must be > 0, got 0"):
        NanoKTO(model, tokenizer, OptimizerFactory(), beta=0)
    with pytest.raises(ValueError, match=r"^stage.module: kto desirable_weight must be > 0, got 0"):
        NanoKTO(model, tokenizer, OptimizerFactory(), desirable_weight=0.0)
    assert math.isclose(NanoKTO(model, tokenizer, OptimizerFactory()).beta, 0.1)


def test_resume_reloads_the_reference_and_matches_an_uninterrupted_run(tiny_cfg, tmp_path, init_dir):  # noqa: F811
    common = ["stage=kto", f"stage.init_from={init_dir}", "optim.total_steps=8", "trainer.val_check_interval=4"]
    _, straight = train(tiny_cfg(*common, "trainer.max_steps=8", f"paths.run_dir={tmp_path / 'a'}"))
    train(tiny_cfg(*common, "trainer.max_steps=4", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(
        tiny_cfg(*common, "trainer.max_steps=8", f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}")
    )
    initial = NanoLM.from_pretrained(init_dir).state_dict()
    for name, tensor in resumed["module"].reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    for (name, a), (_, c) in zip(straight["model"].named_parameters(), resumed["model"].named_parameters()):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0, msg=name)
