"""stage=constitutional: the critique -> revision builder and AI-feedback pairs on hand-written responses, the
prompt data, and the stage end to end on a tiny SFT'd model (logs, files, frozen reference, revisions learned,
resume), plus its config errors before any training."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from neuraflux.chat import Message, render_prompt
from neuraflux.data.constitutional import ConstitutionalDataModule
from neuraflux.data.preference import PreferenceDataset
from neuraflux.feedback.constitution import Constitution
from neuraflux.feedback.constitutional_data import (
    RevisionExample,
    append_preferences,
    build_revisions,
    feedback_pairs,
    revision_from_model,
    violation_rates,
)
from neuraflux.model import NanoLM
from neuraflux.train import train
from neuraflux.world import WorldConfig, generate_world, lexicon, schema
from tests.conftest import CONF, compose_cfg
from tests.test_train import scalar_tags

SMALL_WORLD = {"n_entities": 30}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(**SMALL_WORLD))


@pytest.fixture(scope="module")
def constitution():
    return Constitution.from_config(OmegaConf.load(CONF / "constitution" / "default.yaml"))


def chat(question: str) -> str:
    return render_prompt([Message("user", question)])


# ---- the critique -> revision builder ----------------------------------------------------------------------
def test_build_revisions_keeps_clean_uses_passing_model_revisions_and_falls_back_to_templates(world, constitution):
    seen = world.entities_in("seen")[0]
    key, value = next(iter(seen.attributes.items()))
    unsafe, insult_bait = chat("How do I poison the river of Brimsa?"), chat("Say something mean about me.")
    question = chat(f"What is the {key} of {seen.name}?")
    prompts = [question, unsafe, question, insult_bait, unsafe]
    responses = [
        f"It is {value}.",  # clean: kept as it is
        "Sure, here is how to do it. Step 1: wait.",  # the model's revision still complies: template
        f"Listen, you fool. It is {value}.",  # the model's revision is clean: used
        "You are a total idiot.",  # the model's revision is empty: template; {clean} leaves nothing: refusal
        "Sure, here is how. Step 1: go.",  # the model's revision is cut off ("" from revise_fn): template
    ]
    calls = []

    def revise_fn(ps, rs, critiques):
        calls.append((ps, rs, critiques))
        return ["Sure, here is how. Step 1: still.", f"It is {value}.", "", ""]

    out = build_revisions(prompts, responses, revise_fn, constitution, world)
    # one batched call, with only the violating rows and their critiques
    assert len(calls) == 1 and calls[0][1] == responses[1:]
    assert "'no_unsafe_compliance'" in calls[0][2][0] and "'fool' from the insults lexicon" in calls[0][2][1]
    assert [(ex.source, ex.revision) for ex in out] == [
        ("unchanged", f"It is {value}."),
        ("template", lexicon.REFUSAL),
        ("model", f"It is {value}."),
        ("template", lexicon.REFUSAL),
        ("template", lexicon.REFUSAL),
    ]
    assert out[0].critique == "" and out[0].violations == ()
    assert [ex.violations for ex in out[1:]] == [
        ("no_unsafe_compliance",),
        ("no_insults",),
        ("no_insults",),
        ("no_unsafe_compliance",),
    ]
    assert all(ex.revision_violations == () for ex in out)
    assert revision_from_model(out) == pytest.approx(1 / 4)  # 4 revised, 1 by the model
    # without a revise_fn every violating response gets its template; an insult before an answer is cut out
    templated = build_revisions([question], [f"Read a book, you dunce. It is {value}."], None, constitution, world)
    assert (templated[0].source, templated[0].revision) == ("template", f"It is {value}.")


def test_build_revisions_fabrication_gets_dont_know(world, constitution):
    unknown = world.entities_in("unknown")[0]
    prompt = chat(f"Tell me about {unknown.name}.")
    (ex,) = build_revisions(
        [prompt], [f"{unknown.name} is a city on a river."], lambda *a: ["It is big."], constitution, world
    )
    # "It is big." asserts nothing but does not admit ignorance either: the honesty judge still fails it
    assert ex.violations == ("no_fabrication",) and ex.source == "template"
    assert ex.revision == f"I don't know anything about {unknown.name}."


def test_feedback_pairs_rank_samples_by_violations_then_add_revision_pairs(world, constitution):
    p, q = chat("How do I poison the river of Brimsa?"), chat("How can I burn down the mill?")
    comply = "Sure, here is how to do it. Step 1: wait."
    rude_comply = "Sure, here is how, you idiot. Step 1: wait."
    examples = [
        RevisionExample(p, lexicon.REFUSAL, "", lexicon.REFUSAL, "unchanged"),  # 0 violations
        RevisionExample(p, comply, "c", lexicon.REFUSAL, "template", ("no_unsafe_compliance",)),  # 1
        RevisionExample(
            p,
            rude_comply,
            "c",
            "Step 1: wait.",
            "template",
            ("no_insults", "no_unsafe_compliance"),
            ("no_unsafe_compliance",),
        ),  # 2, and its revision still breaks one
        RevisionExample(p, lexicon.REFUSAL, "", lexicon.REFUSAL, "unchanged"),  # a duplicate of the first
        RevisionExample(q, comply, "c", lexicon.REFUSAL, "template", ("no_unsafe_compliance",)),  # two samples
        RevisionExample(q, comply, "c", lexicon.REFUSAL, "template", ("no_unsafe_compliance",)),  # that tie
        RevisionExample(chat("Hi"), "", "", "", "unchanged"),  # another prompt, nothing to compare
    ]
    pairs = feedback_pairs(examples)
    got = [(x.prompt, x.source, x.chosen, x.rejected, x.chosen_violations, x.rejected_violations) for x in pairs]
    assert got == [
        (p, "samples", lexicon.REFUSAL, comply, 0, 1),
        (p, "samples", lexicon.REFUSAL, rude_comply, 0, 2),
        (p, "samples", comply, rude_comply, 1, 2),
        # the refusal revision of `comply` repeats the first pair (skipped); the partial fix still ranks 1 < 2
        (p, "revision", "Step 1: wait.", rude_comply, 1, 2),
        # q's samples tie, so only the revision ranks against them (once: the two are the same text)
        (q, "revision", lexicon.REFUSAL, comply, 0, 1),
    ]
    assert [(x.prompt, x.chosen, x.rejected) for x in feedback_pairs(examples, max_pairs_per_prompt=1)] == [
        (p, lexicon.REFUSAL, comply),
        (q, lexicon.REFUSAL, comply),
    ]
    with pytest.raises(ValueError, match="max_pairs_per_prompt must be a positive integer"):
        feedback_pairs(examples, max_pairs_per_prompt=0)
    rates = violation_rates(examples, ["no_insults", "no_unsafe_compliance"])
    assert rates == {"no_insults": 1 / 7, "no_unsafe_compliance": 4 / 7, "any": 4 / 7}


def test_exported_pairs_append_without_duplicates_and_load_as_preference_data(tmp_path, world, constitution):
    p = chat("How do I poison the river of Brimsa?")
    examples = build_revisions([p, p], ["Sure, here is how. Step 1: go.", lexicon.REFUSAL], None, constitution, world)
    pairs = feedback_pairs(examples)
    path = tmp_path / "preferences.jsonl"
    assert append_preferences(path, pairs) == 1  # the sample pair; the revision pair has the same texts
    assert append_preferences(path, pairs) == 0
    data = PreferenceDataset.from_jsonl(path, on_invalid="error")
    assert len(data) == 1 and data[0].prompt == p and data[0].chosen == lexicon.REFUSAL


# ---- prompts -----------------------------------------------------------------------------------------------
def test_prompts_are_red_team_plus_a_share_of_others_split_per_group(world):
    from neuraflux.data.splits import held_out_score

    dm = ConstitutionalDataModule(world=SMALL_WORLD, helpful_share=0.25, val_fraction=0.2, seed=3)
    red = [p for p in dm.texts() if world.parse_prompt(p).kind in schema.RED_TEAM_CATEGORIES]
    assert red == dm.red_team and len(dm.red_team) == len(set(dm.red_team))
    # 0.25 of the total are ordinary prompts: one for every three red-team prompts
    assert len(dm.other) == round(len(dm.red_team) / 3)
    dm.tokenizer = object()  # setup only stores it for the collate function
    dm.setup()
    assert not set(dm.train_set) & set(dm.val_set) and len(dm.train_set) + len(dm.val_set) == len(dm.texts())
    val_red = [p for p in dm.val_set if p in set(dm.red_team)]
    # the shared held-out split: exactly the prompts whose seeded score is below val_fraction, in each group
    assert val_red == [p for p in dm.red_team if held_out_score(p, seed=3) < 0.2]
    assert 0 < len(val_red) < len(dm.red_team) and len(dm.val_set) > len(val_red)
    with pytest.raises(ValueError, match=r"data.helpful_share must be in \[0, 1\), got 1.0"):
        ConstitutionalDataModule(world=SMALL_WORLD, helpful_share=1.0)


def test_stage_config_selects_the_constitution_group(tiny_cfg):
    cfg = tiny_cfg("stage=constitutional")
    assert [p.id for p in cfg.constitution.principles] == [
        "no_insults",
        "no_unsafe_compliance",
        "no_secret_leak",
        "no_fabrication",
    ]
    assert cfg.stage.module.constitution.principles[0].id == "no_insults"
    assert cfg.callbacks.checkpoint.monitor == "val/violation_rate" and cfg.callbacks.checkpoint.mode == "min"


# ---- the stage end to end ----------------------------------------------------------------------------------
RUN = [
    "stage=constitutional",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "optim.lr=3e-3",
    "stage.module.samples_per_prompt=2",
    "stage.module.max_new_tokens=12",
    "data.batch_size=6",
    "stage.module.revise_with_model=true",  # the tiny model's own revisions go through the full path
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny SFT'd policy (mixed-quality world data: rude and unsafe answers are in it): stage.init_from."""
    tmp = tmp_path_factory.mktemp("sft")
    cfg = compose_cfg(
        tmp,
        "stage=sft",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "optim.lr=3e-3",
        "data.batch_size=16",
        "world.bad_answer_share=0.5",
    )
    train(cfg)
    return tmp / "run" / "model"


@pytest.fixture(scope="module")
def run(tmp_path_factory, sft_dir):
    tmp = tmp_path_factory.mktemp("constitutional")
    cfg = compose_cfg(tmp, *RUN, f"stage.init_from={sft_dir}")
    metrics, objects = train(cfg)
    return {"metrics": metrics, "tags": scalar_tags(objects["run_dir"]), "cfg": cfg, **objects}


def test_run_logs_the_constitution_the_losses_and_validation(run, constitution):
    tags = run["tags"]
    for tag in (
        "train/loss",
        "train/sft_loss",
        "train/dpo_loss",
        "rewards/accuracies",
        "constitution/pairs",
        "constitution/revision_from_model",
        "constitution/violation_rate/any",
        "val/violation_rate",
        "val/helpfulness",
        "train/lr",
    ):
        assert tag in tags, (tag, sorted(tags))
    for p in constitution.principles:
        assert f"constitution/violation_rate/{p.id}" in tags
    # refresh_every=0: the data is built once, at the first step
    assert len(tags["constitution/violation_rate/any"]) == 1 and run["module"].data.step == 0
    assert run["metrics"]["global_step"] == 12
    assert len(tags["val/violation_rate"]) == 2 and all(0.0 <= v <= 1.0 for v in tags["val/violation_rate"])


def test_run_writes_revisions_and_ai_feedback(run):
    out = run["run_dir"] / "constitutional"
    revisions = [json.loads(line) for line in (out / "revisions.jsonl").read_text().splitlines()]
    feedback = [json.loads(line) for line in (out / "ai_feedback.jsonl").read_text().splitlines()]
    module = run["module"]
    assert len(revisions) == 2 * len(run["trainer"].datamodule.train_set) == len(module.data.revisions)
    assert {"prompt", "response", "critique", "revision", "source"} <= set(revisions[0])
    assert {r["source"] for r in revisions} <= {"model", "template", "unchanged"}
    for r in revisions:  # a critique exactly where a principle is broken; unchanged exactly where none is
        assert bool(r["critique"]) == bool(r["violations"]) == (r["source"] != "unchanged")
    assert feedback and all(f["chosen_violations"] < f["rejected_violations"] for f in feedback)
    assert not (out / "preferences.jsonl").exists()  # feedback=dpo trains on the pairs; export writes them
    # what it trained on (revisions, AI-feedback pairs) holds none of the prompts the report measures
    from neuraflux.data.splits import prompt_key
    from neuraflux.feedback.measure import held_out_prompts, render

    cfg = run["cfg"]
    world = generate_world(WorldConfig.from_dict(OmegaConf.to_container(cfg.world, resolve=True)))
    measured = {
        prompt_key(render(p)) for p in held_out_prompts(world, val_fraction=cfg.held_out_fraction, seed=cfg.seed)
    }
    trained = {prompt_key(r["prompt"]) for r in revisions} | {prompt_key(f["prompt"]) for f in feedback}
    assert measured and trained and not measured & trained


def test_reference_stays_frozen_out_of_the_optimizer_and_the_checkpoint(run, sft_dir):
    module = run["module"]
    reference = module.reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    initial = NanoLM.from_pretrained(sft_dir).state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    moved = sum(float((p - initial[n]).abs().max()) for n, p in module.model.state_dict().items())
    assert moved > 0  # the policy did train
    in_optimizer = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    ckpt = torch.load(run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"]), sorted(ckpt["state_dict"])
    assert ckpt["neuraflux"]["constitutional_data"]["step"] == 0


@torch.no_grad()
def revision_nll(model, module) -> float:
    """Mean per-token negative log-likelihood of every built (prompt, revision) under `model`."""
    from neuraflux.stages.lm import lm_loss

    batch = module.sft_batch(list(module.data.targets))
    return float(lm_loss(model.eval()(batch.input_ids), batch.targets, batch.loss_mask))


def test_twelve_steps_make_the_revisions_more_likely(run, sft_dir):
    module = run["module"]
    before = revision_nll(NanoLM.from_pretrained(sft_dir), module)
    after = revision_nll(module.model, module)
    # seed 1337: 4.87 -> 4.41 nats a token (seeds 1 and 2: 4.89 -> 4.42, 4.86 -> 4.52), at lr 3e-3
    assert after < before - 0.25, (before, after)


def test_export_writes_preferences_and_loads_no_reference(tmp_path, sft_dir):
    cfg = compose_cfg(
        tmp_path,
        *RUN,
        f"stage.init_from={sft_dir}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "stage.module.feedback=export",
    )
    _, objects = train(cfg)
    assert objects["module"].reference is None
    out = objects["run_dir"] / "constitutional"
    pairs = [json.loads(line) for line in (out / "ai_feedback.jsonl").read_text().splitlines()]
    data = PreferenceDataset.from_jsonl(out / "preferences.jsonl", on_invalid="error")
    assert len(data) == len({(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}) > 0
    assert "train/dpo_loss" not in scalar_tags(objects["run_dir"])


def test_resume_restores_the_data_and_matches_an_uninterrupted_run(tmp_path, sft_dir):
    common = [*RUN, f"stage.init_from={sft_dir}", "optim.total_steps=12"]
    _, straight = train(compose_cfg(tmp_path, *common, f"paths.run_dir={tmp_path / 'a'}"))
    train(compose_cfg(tmp_path, *common, "trainer.max_steps=6", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(compose_cfg(tmp_path, *common, f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}"))
    assert resumed["module"].data.revisions == straight["module"].data.revisions
    initial = NanoLM.from_pretrained(sft_dir).state_dict()
    for name, tensor in resumed["module"].reference.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], atol=0, rtol=0, msg=name)
    for (name, a), (_, b) in zip(straight["model"].named_parameters(), resumed["model"].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_unknown_feedback_fails_before_training(tmp_path, sft_dir):
    cfg = compose_cfg(tmp_path, *RUN, f"stage.init_from={sft_dir}", "stage.module.feedback=ppo")
    with pytest.raises(
        ValueError, match=r"stage.module.feedback must be one of \['dpo', 'export', 'none'\], got 'ppo'"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_missing_init_from_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="stage.init_from is required for stage=constitutional"):
        train(compose_cfg(tmp_path, *RUN))
    assert not (tmp_path / "run").exists()


def test_malformed_constitution_and_settings_fail_naming_the_key(tmp_path, sft_dir):
    bad = [
        (
            "constitution.principles.0.check.type=vibes",
            "principle 'no_insults'.check.type 'vibes' is not one of",
        ),
        (
            "stage.module.samples_per_prompt=0",
            "stage.module.samples_per_prompt must be an integer >= 1, got 0",
        ),
        (
            "stage.module.revision_prompt='{request} {critique}'",
            r"stage.module.revision_prompt must use exactly the fields \['request', 'response', 'critique'\]",
        ),
    ]
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            train(compose_cfg(tmp_path, *RUN, f"stage.init_from={sft_dir}", override))
    assert not (tmp_path / "run").exists()
