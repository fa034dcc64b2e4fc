"""stage=reward: preference batches by hand, NanoRewardModel scoring and files, and a run that learns world pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuraflux.chat import ASSISTANT, BOS, END, USER
from neuraflux.data.preference import PreferenceDataset, PreferenceExample
from neuraflux.data.preference_batches import (
    PreferenceDataModule,
    collate_pairs,
    encode_pairs,
    fit_sequence,
    split_by_prompt,
)
from neuraflux.data.prompts import PromptDataModule
from neuraflux.masking import last_token_index
from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.reward import (
    MARKER_FILE,
    NanoRewardModel,
    check_same_tokenizer,
    response_target_mask,
)
from neuraflux.stages.common import check_finite
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.test_train import scalar_tags

TINY_MODEL = NanoConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, max_position_embeddings=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A ~30k-parameter model runs fastest on one thread; two threads spin against each other on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def char_tokenizer(text: str = "hiokn!") -> NanoTokenizer:
    return NanoTokenizer.train([text], vocab_size=0, mode="char")


# ---- batches -----------------------------------------------------------------------------------------------
def test_fit_sequence_cuts_the_prompt_from_the_left_and_keeps_the_response():
    s = fit_sequence([1, 2, 3, 4], [5, 6, 7], max_length=5)
    assert (s.ids, s.response_start, s.response_cut) == ([3, 4, 5, 6, 7], 2, False)
    # a response longer than max_length - 1 keeps its start and one prompt token stays before it
    s = fit_sequence([1, 2], [5, 6, 7, 8, 9], max_length=4)
    assert (s.ids, s.response_start, s.response_cut) == ([2, 5, 6, 7], 1, True)


def test_preference_batch_masks_by_hand():
    tok = char_tokenizer()
    prompt = f"{BOS}{USER}hi{END}{ASSISTANT}"  # 6 tokens: bos user h i end assistant
    other = PreferenceExample(prompt, "hi", "ok")
    first, second = encode_pairs(tok, [other, PreferenceExample(prompt, "ok", "no!")], max_length=32)
    assert (first.index, second.index) == (0, 1)
    batch = collate_pairs([second], pad_id=tok.pad_id)
    # chosen = 6 prompt + "o k <|end|> <|eos|>" = 10 tokens; rejected = 6 + "n o ! <|end|> <|eos|>" = 11, so T = 11
    assert batch.input_ids.shape == (2, 11) and batch.num_pairs == 1
    assert tok.decode(batch.chosen_ids[0].tolist()) == prompt + "ok<|end|><|eos|><|pad|>"
    assert tok.decode(batch.rejected_ids[0].tolist()) == prompt + "no!<|end|><|eos|>"
    assert batch.chosen_attention_mask[0].tolist() == [True] * 10 + [False]
    assert batch.rejected_attention_mask[0].tolist() == [True] * 11
    # targets[t] = ids[t + 1]; the response starts at position 6, i.e. it is the target of positions 5..
    assert batch.targets[0, :10].tolist() == batch.input_ids[0, 1:].tolist()
    assert batch.targets[:, -1].tolist() == [tok.pad_id, tok.pad_id]
    assert batch.chosen_response_mask[0].tolist() == [False] * 5 + [True] * 4 + [False] * 2
    assert batch.rejected_response_mask[0].tolist() == [False] * 5 + [True] * 5 + [False]
    assert tok.decode(batch.targets[batch.response_mask].tolist()) == "ok<|end|><|eos|>no!<|end|><|eos|>"
    assert batch.index.tolist() == [1]
    assert batch.pair(torch.tensor([1.0, 2.0])).rejected.tolist() == [2.0]

    # max_length 8: chosen keeps 8 - 4 = 4 prompt tokens, rejected 8 - 5 = 3, both from the prompt's end
    (cut,) = encode_pairs(tok, [PreferenceExample(prompt, "ok", "no!")], max_length=8)
    assert tok.decode(cut.chosen.ids) == f"hi{END}{ASSISTANT}ok{END}<|eos|>" and cut.chosen.response_start == 4
    assert tok.decode(cut.rejected.ids) == f"i{END}{ASSISTANT}no!{END}<|eos|>" and cut.rejected.response_start == 3
    assert not cut.response_cut


def test_data_module_reads_hh_files_and_names_bad_lines(tmp_path):
    path = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    other = {"chosen": "\n\nHuman: yo\n\nAssistant: hello", "rejected": "\n\nHuman: yo\n\nAssistant: go away!"}
    lines = [json.dumps(good), json.dumps({"chosen": "x"}), json.dumps(other)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"hh.jsonl, line 2: missing field 'rejected'"):
        PreferenceDataModule(path=str(path), on_invalid="error")
    dm = PreferenceDataModule(path=str(path), on_invalid="skip", batch_size=2, val_fraction=0.5, max_length=40)
    dm.tokenizer = char_tokenizer("".join(dm.texts()))
    dm.setup()
    assert len(dm.train_set) == 1 and len(dm.val_set) == 1
    starts = {
        dm.tokenizer.decode(next(iter(dm.sequential_loader(split))).chosen_ids[0].tolist())[:16]
        for split in ("train", "val")
    }
    assert starts == {f"{BOS}{USER}hi{END}{ASSISTANT}hello"[:16], f"{BOS}{USER}yo{END}{ASSISTANT}hello"[:16]}
    with pytest.raises(ValueError, match="data.on_invalid must be one of"):
        PreferenceDataModule(path=str(path), on_invalid="ignore")
    with pytest.raises(ValueError, match="exactly one of data.path or data.builtin"):
        PreferenceDataModule(path=str(path), builtin="world")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        PreferenceDataModule(path=str(tmp_path / "nowhere.jsonl"))


# ---- the reward model --------------------------------------------------------------------------------------
def test_split_holds_out_whole_prompts_the_ones_ppo_validates_on():
    world = {"n_entities": 20, "n_red_team": 9}  # 41 distinct RL prompts (more red-team prompts would repeat)
    dm = PreferenceDataModule(builtin="world", world=world, val_fraction=0.2, seed=5)
    split = split_by_prompt(dm.dataset, 0.2, seed=5)
    train_prompts, val_prompts = {e.prompt for e in split.train}, {e.prompt for e in split.test}
    assert not train_prompts & val_prompts  # no prompt on both sides
    assert len(split.train) + len(split.test) == len(dm.dataset)
    # the world's pairs come in one group per distinct RL prompt: the held-out prompts are PPO's validation prompts
    prompts = PromptDataModule(builtin="world", world=world, val_fraction=0.2, seed=5)
    prompts.tokenizer = char_tokenizer()
    prompts.setup()
    assert val_prompts == set(prompts.val_set)
    one = PreferenceDataset.from_records(
        [{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": "a", "rejected": "c"}]
    )
    with pytest.raises(ValueError, match="1 distinct prompt"):
        split_by_prompt(one, 0.5, seed=0)


def test_practice_pairs_join_the_training_split_only():
    world = {"n_entities": 20, "n_red_team": 9, "practice_entities": 30, "practice_preference_entities": 12}
    with_practice = PreferenceDataModule(builtin="world", world=world, val_fraction=0.2, seed=5)
    without = PreferenceDataModule(
        builtin="world", world={**world, "practice_preference_entities": 0}, val_fraction=0.2, seed=5
    )
    assert without.train_only is None and len(with_practice.train_only) == 12 * 3  # 3 pairs per prompt
    for dm in (with_practice, without):
        dm.tokenizer = char_tokenizer("".join(sorted(set("".join(with_practice.texts())))))
        dm.setup()
    # the held-out pairs are the world's, exactly as without practice pairs; training gets the practice ones too
    assert with_practice.val_set.pairs == without.val_set.pairs
    assert len(with_practice.train_set) == len(without.train_set) + 36


def test_retrieve_context_gives_context_less_prompts_the_top_document():
    from neuraflux.chat import context_of
    from neuraflux.world import WorldConfig, generate_world
    from neuraflux.world.generator import question_text

    world_cfg = {"n_entities": 20, "n_red_team": 9}
    plain = PreferenceDataModule(builtin="world", world=world_cfg, val_fraction=0.2, seed=5)
    ret = PreferenceDataModule(builtin="world", world=world_cfg, val_fraction=0.2, seed=5, retrieve_context=True)
    world = generate_world(WorldConfig(**world_cfg))
    texts = {d.text: d for d in world.retrieval_documents()}
    assert list(ret.dataset) == list(plain.dataset)  # the pairs and so the held-out split stay as generated
    assert plain.with_context(list(plain.dataset)) == list(plain.dataset)
    bare = 0
    for a, b in zip(plain.dataset, ret.with_context(list(ret.dataset)), strict=True):
        assert (a.chosen, a.rejected) == (b.chosen, b.rejected) and question_text(a.prompt) == question_text(b.prompt)
        if context_of(a.prompt) is not None:
            assert b.prompt == a.prompt  # a prompt with its own context keeps it
            continue
        bare += 1
        assert context_of(b.prompt) in texts  # one whole document of the store
        entity = world.parse_prompt(a.prompt).entity
        if entity is not None and entity.split == "seen":
            assert texts[context_of(b.prompt)].entity == entity.name  # the asked entity's own document
    assert bare > 10
    with pytest.raises(ValueError, match="data.retrieve_context=true .* needs data.builtin=world"):
        PreferenceDataModule(path="pairs.jsonl", retrieve_context=True)
    # the encoded validation pairs are the held-out pairs, their prompts given context
    tok = char_tokenizer("".join(sorted(set("".join(ret.texts()) + "".join(d.text for d in world.documents)))))
    for dm in (plain, ret):
        dm.tokenizer = tok
        dm.setup()
    held = list(split_by_prompt(ret.dataset, 0.2, seed=5).test)
    expected = encode_pairs(tok, ret.with_context(held), ret.max_length)
    assert ret.val_set.pairs == expected and len(ret.val_set) == len(plain.val_set)


def test_reward_model_trained_with_retrieved_context_scores_rollouts_with_it(tmp_path):
    from neuraflux.chat import Message, render_prompt
    from neuraflux.data.preference_batches import encode_scored
    from neuraflux.feedback.rewards import RewardModelReward, reward_model_reward
    from neuraflux.rag import add_retrieved_context, world_retriever
    from neuraflux.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(n_entities=20, n_red_team=9))
    seen = world.entities_in("seen")[0]
    question = f"What is the {next(iter(seen.attributes)).replace('_', ' ')} of {seen.name}?"
    prompts = [render_prompt([Message("user", question)]), render_prompt([Message("user", "hi")], context="ctx")]
    responses = ["It is so.", "ok"]
    tok = char_tokenizer("".join(sorted(set(question + "hiokctxItsd." + "".join(d.text for d in world.documents)))))
    torch.manual_seed(0)
    model = NanoRewardModel(
        NanoConfig(
            vocab_size=tok.vocab_size, block_size=256, max_position_embeddings=256, n_layer=1, n_head=2, n_embd=16
        )
    ).eval()
    model.retrieve_context = True
    model.save_pretrained(tmp_path)
    assert NanoRewardModel.from_pretrained(tmp_path).retrieve_context  # recorded in the marker
    with pytest.raises(ValueError, match="needs the world's retriever"):
        RewardModelReward(model)
    with pytest.raises(ValueError, match="stage.module.world must hold the world config"):
        reward_model_reward(model, tok, None)
    scorer = reward_model_reward(model, tok, world.config.__dict__)
    augmented = add_retrieved_context(prompts, world_retriever(world))
    assert augmented[1] == prompts[1] and seen.name in augmented[0].split("<|user|>")[0]  # its own document
    ids, mask = encode_scored(tok, augmented, responses, 256)
    dummy = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(scorer.score(prompts, responses, dummy, dummy.bool()), model.score(ids, mask))
    model.retrieve_context = False  # a plain reward model reads the rollout's own token ids
    torch.testing.assert_close(
        reward_model_reward(model, tok, None).score(prompts, responses, ids, mask), model.score(ids, mask)
    )


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 2, 0, 0]  # a row with no token: 0
    model = NanoRewardModel.from_lm(NanoLM(NanoConfig(vocab_size=11, n_layer=1, n_head=1, n_embd=8, block_size=4)))
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] have no token to score"):
        model.score(torch.ones(2, 2, dtype=torch.long), torch.tensor([[1, 0], [0, 0]], dtype=torch.bool))


def test_score_reads_the_last_real_token_under_any_padding():
    torch.manual_seed(0)
    rm = NanoRewardModel(TINY_MODEL).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = rm.score(ids)
    right = rm.score(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool))
    left = rm.score(torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool))
    torch.testing.assert_close(right, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-6, rtol=0)
    # by hand: the head applied to the backbone's hidden state at the last token
    by_hand = rm.score_head(rm.transformer(ids)[:, -1]).squeeze(-1)
    torch.testing.assert_close(alone, by_hand)
    assert rm.score(ids[:, :3]).item() != pytest.approx(alone.item())  # a different last token, a different score


def test_response_target_mask_by_hand():
    # start token 4; target t is token t + 1, counted when that token is real and after the row's last 4
    ids = torch.tensor([[1, 7, 4, 9, 10, 0], [1, 4, 8, 4, 11, 12], [1, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert response_target_mask(ids, mask, 4).int().tolist() == [
        [0, 0, 1, 1, 0],  # tokens 9, 10; the pad is not counted
        [0, 0, 0, 1, 1],  # after the second 4 only
        [0, 0, 0, 0, 0],  # no start token: nothing
    ]


def test_likelihood_feature_adds_the_weighted_response_log_prob_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    lm = NanoLM(TINY_MODEL).eval()
    rm = NanoRewardModel.from_lm(lm, response_token_id=4).eval()
    ids = torch.tensor([[1, 7, 4, 9, 10, 0], [0, 1, 4, 8, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    plain = NanoRewardModel(TINY_MODEL, transformer=lm.transformer).eval()
    plain.score_head.load_state_dict(rm.score_head.state_dict())
    head_only = plain.score(ids, mask)
    torch.testing.assert_close(rm.score(ids, mask), head_only)  # the weight starts at 0: loss starts at log 2
    rm.loglik_weight.data.fill_(0.5)
    with torch.no_grad():
        logp = torch.log_softmax(lm(ids, mask).float(), dim=-1)  # (B, T, V)
        # by hand: row 0 predicts 9 at position 2 and 10 at 3; row 1 (left padded) 8, 11, 12 at positions 2, 3, 4;
        # the mean over each row's response tokens
        loglik = torch.stack(
            [(logp[0, 2, 9] + logp[0, 3, 10]) / 2, (logp[1, 2, 8] + logp[1, 3, 11] + logp[1, 4, 12]) / 3]
        )
        torch.testing.assert_close(rm.score(ids, mask), head_only + 0.5 * loglik)
    rm.save_pretrained(tmp_path / "rm")
    loaded = NanoRewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.response_token_id == 4 and loaded.loglik_weight.item() == 0.5
    torch.testing.assert_close(loaded.score(ids, mask), rm.score(ids, mask), atol=0, rtol=0)


def test_save_load_round_trip_and_a_policy_directory_is_refused(tmp_path):
    torch.manual_seed(0)
    lm = NanoLM(TINY_MODEL)
    rm = NanoRewardModel.from_lm(lm)
    assert rm.transformer is lm.transformer  # the LM's backbone itself
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    rm.save_pretrained(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / MARKER_FILE).read_text())["format"] == "neuraflux-reward-model-v1"
    loaded = NanoRewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(loaded.score(ids), rm.score(ids), atol=0, rtol=0)
    # the backbone files are exactly what NanoLM writes, so the LM's export does not clobber the reward model
    lm.save_pretrained(tmp_path / "rm")
    torch.testing.assert_close(NanoRewardModel.from_pretrained(tmp_path / "rm").score(ids), rm.score(ids))
    lm.save_pretrained(tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match=r"policy is not a reward model directory \(no reward_model.json\)"):
        NanoRewardModel.from_pretrained(tmp_path / "policy")
    from_dir = NanoRewardModel.from_lm(tmp_path / "policy")
    torch.testing.assert_close(from_dir.transformer(ids), lm.transformer(ids))


def test_check_same_tokenizer_names_both_fingerprints():
    a, b = char_tokenizer("abc"), char_tokenizer("abd")
    check_same_tokenizer(a, char_tokenizer("cba"), "reward model")  # same vocabulary: no error
    with pytest.raises(ValueError) as err:
        check_same_tokenizer(a, b, "reward_model=outputs/rm/model")
    msg = str(err.value)
    assert msg.startswith("reward_model=outputs/rm/model: its tokenizer (fingerprint ")
    assert a.fingerprint() in msg and b.fingerprint() in msg and "is not the policy's" in msg


def test_non_finite_loss_names_step_and_first_bad_input():
    check_finite(3, "train/loss", torch.tensor(0.5), {"rewards/chosen": torch.tensor([float("nan")])})  # loss ok
    with pytest.raises(FloatingPointError) as err:
        check_finite(
            7,
            "train/loss",
            torch.tensor(float("nan")),
            {"rewards/chosen": torch.tensor([1.0]), "rewards/rejected": torch.tensor([1.0, float("inf")])},
        )
    assert str(err.value) == (
        "train/loss is nan at step 7 (first non-finite input: rewards/rejected); stopping (last good checkpoint kept)"
    )


# ---- the stage ---------------------------------------------------------------------------------------------
def test_reward_stage_learns_world_pairs_and_exports_the_reward_model(tiny_cfg):
    # Measured with seed 1337: 0.954 of the 153 training pairs ranked right after 120 steps (seeds 1-3, whose
    # held-out prompts differ: 0.95-1.00), validation 0.85 of the 27 pairs of the held-out prompts; chance 0.5.
    # likelihood weight 0 at the start (the default is 10): the feature is on, and the first loss is exactly log 2
    # the world's own pairs only (no practice pairs), with retrieved context (the default)
    cfg = tiny_cfg(
        "stage=reward",
        "optim.lr=1e-2",
        "data.batch_size=16",
        "trainer.max_steps=120",
        "trainer.val_check_interval=120",
        "stage.module.likelihood_weight=0.0",
        "world.practice_preference_entities=0",
    )
    assert cfg.data.retrieve_context
    assert cfg.data._target_ == "neuraflux.data.preference_batches.PreferenceDataModule"
    metrics, objects = train(cfg)
    module, run = objects["module"], objects["run_dir"]
    tags = scalar_tags(run)
    for tag in (
        "train/loss",
        "val/loss",
        "val/accuracies",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
    ):
        assert tag in tags, tag
    # a near-zero head at initialisation: the first loss is about -log sigmoid(0) = log 2. The head's N(0, 0.02)
    # weights over 32 unit-scale features give scores of std ~0.11, so a batch's mean margin of up to ~0.1 moves
    # the loss by up to ~0.05 (-log sigmoid(m) ~ log 2 - m / 2); measured 0.718 with today's split
    assert tags["train/loss"][0] == pytest.approx(math.log(2), abs=0.05)

    rm = module.model.eval()
    dm = objects["trainer"].datamodule
    right = total = 0
    with torch.no_grad():
        for batch in dm.sequential_loader("train"):
            r = batch.pair(rm.score(batch.input_ids, batch.attention_mask))
            right, total = right + int((r.chosen > r.rejected).sum()), total + batch.num_pairs
    assert total == 153 and right / total >= 0.9
    assert metrics["val/accuracies"] >= 0.65

    exported = NanoRewardModel.from_pretrained(run / "model")
    assert exported.retrieve_context  # scorers must give its prompts the same retrieved context
    # the response log-likelihood's weight is trained with the rest and saved with the head
    assert exported.response_token_id == objects["tokenizer"].token_to_id(ASSISTANT)
    assert exported.loglik_weight.item() == pytest.approx(rm.loglik_weight.item()) != 0.0
    check_same_tokenizer(NanoTokenizer.load(run / "model"), objects["tokenizer"], "exported reward model")
    batch = next(iter(dm.sequential_loader("val")))
    torch.testing.assert_close(
        exported.score(batch.input_ids, batch.attention_mask), rm.score(batch.input_ids, batch.attention_mask)
    )


def test_reward_stage_gets_the_backbone_diagnostics(tiny_cfg):
    # the design's gradient flow, activation statistics and attention maps for every stage: a reward model is the
    # backbone plus a score head (no text samples: it does not generate)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("stage=reward", "callbacks=default", "~callbacks.model_summary",
                   "callbacks.gradient_flow.every_n_steps=2", "callbacks.activations.every_n_steps=2",
                   "callbacks.attention_maps.every_n_steps=2", "callbacks.text_samples.every_n_steps=2",
                   "world.practice_preference_entities=0")  # fmt: skip
    assert cfg.callbacks.gradient_flow is not None
    _, objects = train(cfg)
    acc = EventAccumulator(str(objects["run_dir"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        "grad_norm/embeddings",
        "grad_norm/layer0",
        "grad_norm/layer1",
        "grad_norm/final_norm",
        "grad_norm/head",
        "activations/layer0/mean",
        "activations/layer1/gelu_zero_frac",
    ):
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("grad_norm/head")) == 3  # optimizer steps 0, 2, 4 of 6
    assert {"attention/layer0", "attention/layer1"} <= set(tags["images"])
    assert "grad_hist/layer0" in tags["histograms"]
    assert not any(t.startswith("samples") for t in tags["tensors"])
