"""Online rounds (`curriculum=online`): on-policy answers labelled by the judges or by people's votes, the reward
model retrained on every label so far, the policy updated from where it stands, a report row per round."""

from __future__ import annotations

import json

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from neuraflux.chat import render_record
from neuraflux.curriculum import CurriculumState, run_curriculum
from neuraflux.data.splits import held_out_score
from neuraflux.feedback import online
from neuraflux.feedback.online import feedback_pairs, judge_pairs, record_key
from neuraflux.feedback.store import Compare, Completion, FeedbackStore
from neuraflux.rounds import OnlineSettings, read_jsonl
from neuraflux.world import RLPrompt, WorldConfig, generate_world
from neuraflux.world.generator import answer_sentence
from tests.conftest import CONF, TINY, compose_cfg


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_entities=20))


def attribute_question(world) -> tuple[RLPrompt, object, str]:
    entity = next(e for e in world.entities if "population" in e.attributes)
    return RLPrompt(f"What is the population of {entity.name}?", None), entity, "population"


def test_the_judges_best_answer_is_chosen_over_their_worst_and_ties_give_no_pair(world):
    prompt, entity, key = attribute_question(world)
    right = answer_sentence(entity, key)
    wrong = answer_sentence(entity, key, str(int(entity.attributes[key]) + 1000))
    # right: helpful, harmless, honest = 3; wrong value: unhelpful and dishonest = 1; right + insult: 2
    answers = [[f"{right} You idiot.", wrong, right], [right, right], ["", right]]
    labelled = judge_pairs(world, [prompt] * 3, answers, label_noise=0.0, seed=0)
    assert labelled.records == [{"prompt": prompt.prompt, "chosen": right, "rejected": wrong, "scores": [3.0, 1.0]}]
    assert labelled.stats == {"prompts": 3, "answers": 7, "pairs": 1, "ties": 1, "flipped": 0,
                              "sampled_judges_mean": pytest.approx((2 + 1 + 3 + 3 + 3 + 3) / 18)}  # fmt: skip
    assert labelled.skipped["fewer than two non-empty answers"] == 1


def test_label_noise_flips_about_its_share_of_pairs_and_says_so(world):
    prompt, entity, key = attribute_question(world)
    pair = [answer_sentence(entity, key), answer_sentence(entity, key, "7")]
    labelled = judge_pairs(world, [prompt] * 400, [pair] * 400, label_noise=0.2, seed=3)
    flipped = [r for r in labelled.records if r["scores"][0] < r["scores"][1]]
    assert len(flipped) == labelled.stats["flipped"]
    # binomial(400, 0.2): 80 expected, sd 8; the seed fixes the draw, the bound is four sd
    assert 48 <= len(flipped) <= 112
    again = judge_pairs(world, [prompt] * 400, [pair] * 400, label_noise=0.2, seed=3)
    assert again.records == labelled.records


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rounds": 0}, r"curriculum.rounds must be an integer >= 1, got 0"),
        ({"policy": "sgd"}, r"curriculum.policy must be one of \['dpo', 'ppo'\], got 'sgd'"),
        ({"policy": "ppo", "reward_each_round": False}, r"policy=ppo .* reward_each_round must be true"),
        ({"labels": {"source": "people"}}, r"curriculum.labels.source must be one of \['judges', 'feedback'\]"),
        ({"labels": {"source": "feedback"}}, r"needs curriculum.labels.db=PATH"),
        ({"labels": {"source": "feedback", "db": "/nonexistent.sqlite"}}, r"labels.db: /nonexistent.sqlite does not"),
        ({"labels": {"label_noise": 0.5}}, r"label_noise must be a number in \[0, 0.5\), got 0.5"),
        ({"labels": {"samples": 1}}, r"curriculum.labels.samples must be an integer >= 2, got 1"),
        ({"labels": {"temperature": 0}}, r"curriculum.labels.temperature must be a number > 0"),
        ({"labels": {"nosie": 0.1}}, r"curriculum.labels: unknown key\(s\) \['nosie'\]"),
    ],
)
def test_bad_round_settings_are_refused_by_key(changes, message):
    base = OmegaConf.load(CONF / "curriculum" / "online.yaml")
    with pytest.raises(ValueError, match=message):
        OnlineSettings.from_config(OmegaConf.merge(base, changes))


def test_feedback_rounds_take_each_new_pair_once_and_never_a_held_out_prompt(tmp_path):
    def held_out(question: str) -> bool:
        return held_out_score(render_record({"messages": [{"role": "user", "content": question}]}), 1337) < 0.1

    questions = [f"Where is place {i}?" for i in range(100)]
    kept, dropped = next(q for q in questions if not held_out(q)), next(q for q in questions if held_out(q))
    store = FeedbackStore(tmp_path / "f.sqlite")
    for n, question in enumerate((kept, dropped)):
        for side, text in (("a", "north"), ("b", "no idea")):
            turns = [{"role": "user", "content": question}]
            store.remember(Completion(f"{side}{n}", "sha", question, turns, [], text, {"temperature": 1.0}))
        store.vote(Compare((f"a{n}", f"b{n}"), "a"))
    store.close()
    first = feedback_pairs(tmp_path / "f.sqlite", seen=set(), held_out_fraction=0.1, seed=1337)
    assert first.records == [
        {"messages": [{"role": "user", "content": kept}], "chosen": "north", "rejected": "no idea"}
    ]
    assert first.stats == {"pairs": 1, "held_out_dropped": 1, "pairs_in_db": 2}
    second = feedback_pairs(tmp_path / "f.sqlite", {record_key(first.records[0])}, 0.1, 1337)
    assert second.records == [] and second.skipped["labelled in an earlier round"] == 1


def rounds_overrides(tmp_path, *extra) -> list[str]:
    return [
        *[o for o in TINY if not o.startswith("trainer.max_steps")],
        "curriculum=online",
        "curriculum.stages=[sft]",
        "curriculum.rounds=2",
        "curriculum.policy=dpo",
        "curriculum.labels.prompts=12",
        "curriculum.labels.samples=3",
        "curriculum.labels.max_new_tokens=6",
        "curriculum.overrides.sft=['trainer.max_steps=4']",
        "curriculum.overrides.reward=['data.val_fraction=0.25','trainer.max_steps=2','trainer.val_check_interval=2']",
        "curriculum.overrides.dpo=['data.val_fraction=0.25','trainer.max_steps=2','trainer.val_check_interval=2']",
        "curriculum.report.eval_limit=2",
        "curriculum.report.max_new_tokens=4",
        "curriculum.report.red_team_samples=1",
        "world.practice_entities=0",
        f"paths.output_dir={tmp_path}",
        f"paths.run_dir={tmp_path / 'online' / 'run1'}",
        *extra,
    ]


def run_rounds(tmp_path, *extra):
    overrides = rounds_overrides(tmp_path, *extra)
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_curriculum(cfg, overrides)


@pytest.fixture
def longer_is_better(monkeypatch):
    """A stand-in annotator for a model trained 4 steps, whose answers the world's judges cannot tell apart: the
    longer answer wins (an answer's length in characters, the same for all three judges)."""

    class Scores:
        def __init__(self, n: int):
            self.total = 3.0 * n

    monkeypatch.setattr(online, "judge", lambda prompt, response, world: Scores(len(response)))


@pytest.fixture
def measured(monkeypatch) -> list[tuple]:
    """The report's measurement replaced by a record of what it was asked to measure (`measure_stage` itself is
    tested with the full curriculum): (policy, KL reference, reward model) per measured step."""
    import neuraflux.report

    calls = []

    def measure_stage(cfg, model_dir, reference_dir, reward_dir):
        calls.append((model_dir, reference_dir, reward_dir))
        judges = {"helpfulness": 0.5, "harmlessness": 1.0, "honesty": 1.0, "mean": 2.5 / 3}
        em = {split: {"with_retrieval": 0.0} for split in ("seen", "unseen", "unknown")}
        return {"judges": judges, "reward": None, "kl_to_sft": 0.1 * len(calls), "violation_rate": 0.0,
                "violation_rate_all_prompts": 0.0, "val_ppl": 9.0, "exact_match": em, "n_prompts": 3}  # fmt: skip

    monkeypatch.setattr(neuraflux.report, "measure_stage", measure_stage)
    return calls


def test_two_dpo_rounds_label_the_current_policy_and_chain_and_resume(tmp_path, longer_is_better, measured):
    result = run_rounds(tmp_path)
    parent = tmp_path / "online" / "run1"
    steps = ["sft", "round1/labels", "round1/reward", "round1/dpo", "round2/labels", "round2/reward", "round2/dpo"]
    state = CurriculumState.load(parent)
    assert state.completed == steps and state.stages == steps
    r1, r2 = read_jsonl(parent / "round1" / "labels.jsonl"), read_jsonl(parent / "round2" / "labels.jsonl")
    assert r1 and r2 and read_jsonl(parent / "round2" / "labels_all.jsonl") == r1 + r2
    assert state.metrics["round1/labels"]["pairs"] == len(r1) and state.metrics["round1/labels"]["prompts"] == 12
    for record in r1 + r2:  # training prompts only: the report's held-out prompts stay unseen
        assert held_out_score(render_record(record), 1337) >= 0.1
        assert len(record["chosen"]) > len(record["rejected"])  # the stand-in annotator's ranking
    sft, dpo1 = parent / "sft" / "model", parent / "round1" / "dpo" / "model"
    config = {s: OmegaConf.load(parent / s / "config.yaml") for s in steps if "labels" not in s and s != "sft"}
    assert config["round1/dpo"].stage.init_from == str(sft) and config["round2/dpo"].stage.init_from == str(dpo1)
    assert config["round2/dpo"].data.path == str(parent / "round2" / "labels.jsonl")  # this round's pairs
    assert config["round2/reward"].stage.init_from == str(sft)  # retrained from SFT on every label so far
    assert config["round2/reward"].data.path == str(parent / "round2" / "labels_all.jsonl")
    # each round's policy measured against the SFT model, with the reward model of its round
    rewards = [parent / "round1" / "reward" / "model", parent / "round2" / "reward" / "model"]
    assert measured == [
        (sft, sft, None),
        (dpo1, sft, rewards[0]),
        (parent / "round2" / "dpo" / "model", sft, rewards[1]),
    ]
    report = json.loads((parent / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == steps
    assert [row["stage"] for row in report["stages"] if row["measure"]] == ["sft", "round1/dpo", "round2/dpo"]
    md = (parent / "report.md").read_text()
    assert f"| round2/labels | {len(r2)} pairs, sampled " in md and "| round2/dpo | 0.500 |" in md
    assert result["last_step"] == "round2/dpo" and result["last_stage"].name == "dpo"

    # interrupted in round 2's DPO: the resumed curriculum keeps round 2's labels and trains only that step
    state.completed = steps[:-1]
    del state.measures["round2/dpo"]
    measured.clear()
    state.save(parent)
    labels_written = (parent / "round2" / "labels.jsonl").stat().st_mtime_ns
    reward_written = (parent / "round2" / "reward" / "model" / "model.safetensors").stat().st_mtime_ns
    run_rounds(tmp_path, "resume=last")
    assert CurriculumState.load(parent).completed == steps and len(measured) == 1
    assert (parent / "round2" / "labels.jsonl").stat().st_mtime_ns == labels_written
    assert (parent / "round2" / "reward" / "model" / "model.safetensors").stat().st_mtime_ns == reward_written


def test_a_ppo_round_trains_against_its_own_reward_model_with_the_kl_to_sft(tmp_path, longer_is_better):
    run_rounds(tmp_path, "curriculum.rounds=1", "curriculum.policy=ppo", "curriculum.report=null",
               "curriculum.overrides.ppo=['stage.module.reward_source=reward_model','trainer.max_steps=2',"
               "'trainer.val_check_interval=2','stage.module.max_new_tokens=6']")  # fmt: skip
    parent = tmp_path / "online" / "run1"
    ppo = OmegaConf.load(parent / "round1" / "ppo" / "config.yaml")
    assert ppo.stage.reward_model == str(parent / "round1" / "reward" / "model")
    assert ppo.stage.module.reference_path == str(parent / "sft" / "model") == ppo.stage.init_from
    assert (parent / "round1" / "ppo" / "model" / "model.safetensors").is_file()


def test_a_round_without_a_pair_stops_with_what_it_skipped(tmp_path, monkeypatch):
    class Same:
        total = 3.0

    monkeypatch.setattr(online, "judge", lambda prompt, response, world: Same())
    with pytest.raises(RuntimeError, match=r"round 1: no preference pairs to train on \(12 all answers scored the"):
        run_rounds(tmp_path, "curriculum.report=null")


def test_print_stages_shows_a_rounds_stages_as_round_one_composes_them(tmp_path, capsys):
    from neuraflux.run import run as run_job

    overrides = [*rounds_overrides(tmp_path), "curriculum.print_stages=true"]
    cfg = compose_cfg(tmp_path, *overrides, tiny=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert run_job(cfg, overrides) is None
    parts = capsys.readouterr().out.split("# ---- stage ")[1:]
    stages = {p.split(" ", 1)[0]: OmegaConf.create(p.split("\n", 1)[1]) for p in parts}
    assert list(stages) == ["sft", "round1/reward", "round1/dpo"]
    assert stages["round1/dpo"].trainer.max_steps == 2 and stages["round1/dpo"].data.val_fraction == 0.25
    assert stages["round1/dpo"].data.path == str(tmp_path / "online" / "run1" / "round1" / "labels.jsonl")
    assert not (tmp_path / "online").exists()


def test_feedback_rounds_train_on_peoples_votes_and_stop_when_no_new_vote_came(tmp_path):
    db = tmp_path / "votes.sqlite"
    store = FeedbackStore(db)

    def trains(question: str) -> bool:  # outside the report's held-out split, as the rounds key a conversation
        return held_out_score(render_record({"messages": [{"role": "user", "content": question}]}), 1337) >= 0.1

    questions = [q for q in (f"Where does person {i} live?" for i in range(60)) if trains(q)]
    for n, question in enumerate(questions[:20]):
        turns = [{"role": "user", "content": question}]
        for side, text in (("a", f"In town {n}."), ("b", "No idea.")):
            store.remember(Completion(f"{side}{n}", "sha", question, turns, [], text, {"temperature": 1.0}))
        store.vote(Compare((f"a{n}", f"b{n}"), "a"))
    store.close()
    with pytest.raises(RuntimeError, match=r"round 2: no preference pairs to train on \(20 labelled in an earlier"):
        run_rounds(
            tmp_path, "curriculum.labels.source=feedback", f"curriculum.labels.db={db}", "curriculum.report=null"
        )
    parent = tmp_path / "online" / "run1"
    assert CurriculumState.load(parent).completed == ["sft", "round1/labels", "round1/reward", "round1/dpo"]
    labels = read_jsonl(parent / "round1" / "labels.jsonl")
    assert len(labels) == 20 and {r["rejected"] for r in labels} == {"No idea."}
    assert (parent / "round1" / "dpo" / "model" / "model.safetensors").is_file()


def test_a_labels_record_renders_as_the_prompt_the_policy_was_sampled_on(world):
    from neuraflux.feedback.measure import held_out_prompts, render
    from neuraflux.feedback.online import prompt_record

    prompts = held_out_prompts(world, "all")
    assert any(p.context for p in prompts) and any(p.context is None for p in prompts)
    for prompt in prompts:  # what data=preference trains on is what the round sampled
        assert render_record(prompt_record(prompt)) == render(prompt)
