"""`neuraflux export`: a model written for other libraries, with a model card (README.md).

The format itself lives in its own module (hf: model/hf.py); this one reads the model (model/io.py), keeps the
output directory safe (never the model being read, never a non-empty one without `force`, every file written
beside it first and moved in at the end), and writes the card: the architecture and chat format the export has,
and what the run that trained it recorded beside it (config.yaml, metrics.json, the curriculum's report.md and
curriculum.json), quoted from those files. Whatever is not there is said to be missing, never filled in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from neuraflux.chat import END, EOS, SPECIAL_TOKENS, Message, render_prompt
from neuraflux.model.nano import NanoLM
from neuraflux.tokenizer import NanoTokenizer

log = logging.getLogger(__name__)

FORMATS = ("hf",)
CARD_FILE = "README.md"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.json"
CURRICULUM_STATE = "curriculum.json"
CURRICULUM_REPORT = "report.md"


def export_model(source: str | Path, out: str | Path, format: str = "hf", force: bool = False) -> Path:
    """Write the model of `source` (run directory, model directory or .ckpt) to `out` in `format`, with a model
    card. `out` must be absent or empty unless `force` (then files of the same name are replaced, others kept),
    and is never where the model is read from."""
    from neuraflux.model.hf import require_transformers, write_transformers
    from neuraflux.model.io import load_pretrained, model_directory

    if format not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    require_transformers()  # a missing extra is said before anything is read
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run directory, model directory or checkpoint")
    read_from = {source.resolve(), model_directory(source).resolve()} if source.is_dir() else {source.resolve()}
    if any(out.resolve() == p or out.resolve() in p.parents for p in read_from):
        raise ValueError(f"{out} holds the model being exported; write the export somewhere else")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to write the export into it")
    model, tokenizer = load_pretrained(source)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        architecture = write_transformers(model, tokenizer, staging)
        (staging / CARD_FILE).write_text(model_card(source, model, tokenizer, architecture))
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s (%s)", source, out, architecture)
    return out


def run_directory(source: Path) -> Path | None:
    """The run directory `source` belongs to (the one whose config.yaml train() wrote): `source` itself, the
    parent of a `model/` directory, or the run above `checkpoints/last.ckpt`. None for a model saved elsewhere."""
    source = Path(source)
    if source.is_file():
        candidates = [source.parent.parent, source.parent]
    else:
        candidates = [source, source.parent]
    return next((d for d in candidates if (d / RUN_CONFIG).is_file()), None)


def model_card(source: Path, model: NanoLM, tokenizer: NanoTokenizer, architecture: str) -> str:
    """README.md for the transformers export of `model`, read from `source` (what was exported)."""
    config = model.config
    run = run_directory(source)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- neuraflux",
        f"- {'gpt2' if architecture.startswith('GPT2') else 'gpt_neox'}",
        "---",
        "",
        f"# {run.name if run is not None else Path(source).name}",
        "",
        f"A {model.num_parameters():,}-parameter language model trained with NeuraFlux, exported from `{source}` as "
        f"`{architecture}`: `AutoModelForCausalLM` and `AutoTokenizer` load it without custom code.",
        "",
        "## Architecture",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in config.to_dict().items()),
        "",
        architecture_note(architecture, config.bias),
        "",
        "## Tokenizer and chat format",
        "",
        f"{'Byte-level BPE' if tokenizer.mode == 'bpe' else 'Character'} tokenizer, {tokenizer.vocab_size:,} tokens; "
        f"special tokens {', '.join(f'`{t}`' for t in SPECIAL_TOKENS)}. The tokenizer's chat template renders a "
        "conversation as NeuraFlux does (roles user, assistant, context for a retrieved document, and system read "
        "as context; `context=` puts a document first):",
        "",
        "```",
        render_prompt([Message("user", "Which region is Kaesrus in?")], context="Kaesrus lies in Duskmoor."),
        "```",
        "",
        f"Generation stops at `{END}` (end of turn) or `{EOS}` (generation_config.json).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=32, do_sample=False)",
        'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        *training_section(run),
    ]
    return "\n".join(lines).rstrip() + "\n"


def architecture_note(architecture: str, bias: bool) -> str:
    if architecture.startswith("GPT2"):
        note = (
            "GPT-2 layout: learned absolute positions, pre-LayerNorm blocks, exact (erf) GELU "
            '(`activation_function="gelu"`), head tied to the token embedding.'
        )
    else:
        note = (
            "GPT-NeoX layout with `use_parallel_residual=False` (attention, then the MLP, each added to the stream) "
            "and rotary positions on every head dimension (`partial_rotary_factor=1.0`); exact (erf) GELU, head tied "
            "to the token embedding."
        )
    if not bias:
        note += (
            " The NeuraFlux model has no biases (`bias=False`); the biases this architecture always has are "
            "stored as zeros, which computes the same."
        )
    return note


def training_section(run: Path | None) -> list[str]:
    """The run's stage, data and settings, metrics and curriculum report, from the files it wrote."""
    if run is None:
        return ["## Training", "", "No run config (config.yaml) was found beside the model: its training is not "
                "described here."]  # fmt: skip
    cfg = yaml.safe_load((run / RUN_CONFIG).read_text()) or {}
    stage = (cfg.get("stage") or {}).get("name", "unknown")
    lines = ["## Training", "", f"Stage `{stage}`, from the run directory `{run}`."]
    curriculum = run.parent / CURRICULUM_STATE
    if curriculum.is_file():
        state = json.loads(curriculum.read_text())
        lines += ["", f"Curriculum stages: {', '.join(state.get('stages', []))}; completed: "
                  f"{', '.join(state.get('completed', [])) or 'none'}."]  # fmt: skip
    for key in ("data", "tokenizer", "optim"):
        if cfg.get(key) is not None:
            lines += ["", f"### {key}", "", "```yaml", yaml.safe_dump(cfg[key], sort_keys=False).rstrip(), "```"]
    trainer = cfg.get("trainer") or {}
    if "max_steps" in trainer:
        lines += ["", f"Trained for trainer.max_steps={trainer['max_steps']} steps, seed {cfg.get('seed')}."]
    lines += ["", "<details><summary>The run's whole config.yaml</summary>", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>"]  # fmt: skip
    metrics = run / METRICS
    lines += ["", "## Metrics", ""]
    if metrics.is_file():
        values = json.loads(metrics.read_text())
        lines += [f"The run's last logged values ({METRICS}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(values.items())]
    else:
        lines.append(f"The run wrote no {METRICS}.")
    report = run.parent / CURRICULUM_REPORT
    if report.is_file():
        # the report's headings two levels down, under this card's own
        body = [("##" + line) if line.startswith("#") else line for line in report.read_text().splitlines()]
        lines += ["", "## Curriculum report", "", f"From `{report}`:", "", *body]
    return lines
