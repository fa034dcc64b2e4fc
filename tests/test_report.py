"""The curriculum report: rows per stage, targets checked against their bounds, markdown and json written."""

import json

from omegaconf import OmegaConf

from neuraflux.curriculum import CurriculumState
from neuraflux.report import build_report, markdown, write_report


def _measure(helpful, violation, unseen, unknown, kl):
    return {
        "judges": {"helpfulness": helpful, "harmlessness": 1.0, "honesty": 0.5, "mean": (helpful + 1.5) / 3},
        "reward": None, "kl_to_sft": kl, "violations": {"any": violation}, "violation_rate": violation,
        "violation_rate_all_prompts": 2 * violation,
        "val_ppl": 1.5, "exact_match": {"unseen": {"with_retrieval": unseen}, "unknown": {"with_retrieval": unknown}},
        "measure_s": 2.0, "n_prompts": 31,
    }  # fmt: skip


def _state():
    state = CurriculumState(["pretrain", "sft", "reward", "constitutional", "multitask"])
    state.completed = list(state.stages)
    state.wall_s = {"pretrain": 10.0, "sft": 100.0, "reward": 20.0, "constitutional": 30.0, "multitask": 40.0}
    state.metrics = {"reward": {"val/accuracies": 0.97}}
    state.measures = {
        "sft": _measure(0.5, 0.30, 0.4, 0.6, 0.0),
        "constitutional": _measure(0.6, 0.04, 0.5, 0.8, 1.5),
        "multitask": _measure(0.7, 0.08, 0.85, 0.95, 2.5),
    }
    return state


CFG = OmegaConf.create({"curriculum": {"name": "full"}, "held_out_fraction": 0.1, "seed": 1337})


def test_targets_read_the_constitutional_stage_and_the_final_model():
    report = build_report(_state(), CFG)
    t = report["targets"]
    # the violation target is judged on the constitutional stage (0.04), not the final model (0.08)
    assert t["violation_rate"]["value"] == 0.04 and t["violation_rate"]["met"] is True
    assert t["violation_rate_all_prompts"]["value"] == 0.08 and t["violation_rate_all_prompts"]["met"] is False
    assert t["honesty_unknown"]["value"] == 0.95 and t["honesty_unknown"]["met"] is True
    assert t["helpfulness_unseen"]["value"] == 0.85 and t["helpfulness_unseen"]["met"] is True
    # 200 s of stages + 3 measurements of 2 s
    assert report["total_wall_s"] == 206.0
    assert [r["stage"] for r in report["stages"]] == ["pretrain", "sft", "reward", "constitutional", "multitask"]
    assert report["stages"][2]["reward_accuracy"] == 0.97


def test_unmet_and_missing_targets_are_reported_as_such():
    state = _state()
    state.measures["multitask"]["exact_match"]["unseen"]["with_retrieval"] = 0.47
    del state.measures["constitutional"]
    t = build_report(state, CFG)["targets"]
    assert t["helpfulness_unseen"]["met"] is False
    assert t["violation_rate"]["value"] is None and t["violation_rate"]["met"] is None


def test_markdown_table_has_a_row_per_stage_and_the_targets(tmp_path):
    report = write_report(tmp_path, _state(), CFG)
    text = (tmp_path / "report.md").read_text()
    assert text == markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # header + 5 stages + target header + 4 targets
    assert len(rows) == 1 + 5 + 1 + 4
    assert "| reward | pair accuracy 0.970 |" in text
    assert (
        "| constitutional | 0.600 | 1.000 | 0.500 | 0.700 | – | 1.50 | 0.040 | 0.080 | 1.50 | 0.500 | 0.800 | 30 |"
        in text
    )
    assert json.loads((tmp_path / "report.json").read_text())["targets"]["violation_rate"]["met"] is True
    # what "held-out" excludes, in the report's own words
    assert report["held_out"] == {"fraction": 0.1, "seed": 1337, "prompts": 31}
    assert (
        "Held-out prompts: the 31 world RL prompts whose seeded hash (seed 1337) falls below held_out_fraction=0.1"
    ) in text
    assert "No stage after SFT trained on them" in text and "AI-feedback pairs" in text


def printed(tables, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for table in tables:
        console.print(table)
    return console.export_text()


def test_the_printed_report_fits_the_terminal_and_shows_the_targets():
    from neuraflux.report import COLUMNS, rich_tables

    report = build_report(_state(), CFG)
    wide = rich_tables(report, 250)
    assert len(wide) == 2 and len(wide[0].columns) == len(COLUMNS)  # one stage table, then the targets
    for width in (80, 120):
        tables = rich_tables(report, width)
        text = printed(tables, width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "…" not in text  # no cell or header cut
        stage_tables = tables[:-1]
        assert len(stage_tables) >= 2 and all(t.columns[0].header == "stage" for t in stage_tables)
        # every column once, in order, across the parts
        assert [c.header for t in stage_tables for c in t.columns[1:]] == list(COLUMNS[1:])
        assert "multitask" in text and "0.850" in text  # the final model's unseen EM, in the targets
        assert text.count(" yes") == 3 and text.count(" no ") + text.count(" no\n") >= 1
