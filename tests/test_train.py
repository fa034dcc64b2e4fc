"""The training entry point end to end, on configs composed from the real conf/ tree."""

import json
import math
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neuraflux.model import NanoLM, generate
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.train import train
from tests.conftest import ROOT, grads_of, small_lm


def scalar_tags(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_pretrain_writes_tensorboard_checkpoints_and_a_loadable_model(tiny_cfg):
    cfg = tiny_cfg()
    metrics, objects = train(cfg)
    run = objects["run_dir"]
    tags = scalar_tags(run)
    for tag in ("train/loss", "val/loss", "val/ppl", "train/lr", "train/tokens_per_sec", "train/grad_norm"):
        assert tag in tags, tag
    assert len(tags["train/loss"]) == 6 and len(tags["val/loss"]) == 2
    assert tags["val/ppl"][-1] == pytest.approx(torch.tensor(tags["val/loss"][-1]).exp().item(), rel=1e-4)
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt"}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["global_step"] == 6 and saved["params"] == objects["model"].num_parameters()
    # the exported model generates without Lightning
    model, tok = NanoLM.from_pretrained(run / "model"), NanoTokenizer.load(run / "model")
    ids = torch.tensor([tok.encode("The")])
    out = generate(model, ids, 5, temperature=0)
    assert out.shape == (1, ids.shape[1] + 5)


def test_a_compiled_run_keeps_its_parameter_names(tiny_cfg):
    # callbacks.compile compiles the model in place: checkpoints and the export hold the eager run's keys
    _, objects = train(tiny_cfg("callbacks.compile.enabled=true", "callbacks.compile.backend=eager"))
    model, run = objects["model"], objects["run_dir"]
    assert model._compiled_call_impl is not None
    keys = set(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    assert keys == {f"model.{k}" for k in model.state_dict()} and not any("_orig_mod" in k for k in keys)
    assert NanoLM.from_pretrained(run / "model").state_dict().keys() == model.state_dict().keys()
    # switched off (the default), it is not built at all: Lightning calls every callback's hooks every step
    from neuraflux.callbacks.compile import CompileModel
    from neuraflux.train import build_callbacks

    assert any(isinstance(c, CompileModel) for c in objects["trainer"].callbacks)
    assert not any(isinstance(c, CompileModel) for c in build_callbacks(tiny_cfg()))


def test_training_lowers_the_loss(tiny_cfg):
    metrics, _ = train(tiny_cfg("trainer.max_steps=40", "trainer.val_check_interval=40", "optim.lr=3e-3"))
    # from ln(vocab) ~ 5.7 at initialisation; 40 steps on the world text reach well below 5
    assert metrics["val/loss"] < 5.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_head=3", "model.n_embd (32) must be divisible by model.n_head (3)"),
        ("optim.lr=-0.1", "optim.lr must be > 0"),
        ("model.block_size=1024", "model.block_size (1024) must be <= model.max_position_embeddings (512)"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
        ("trainer.accumulate_grad_batches=2", "must be a multiple of trainer.accumulate_grad_batches (2)"),
    ],
)
def test_nonsense_config_fails_before_training(tiny_cfg, tmp_path, override, message):
    with pytest.raises(ValueError) as err:
        train(tiny_cfg(override))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_existing_checkpoints_are_never_overwritten(tiny_cfg, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train(tiny_cfg())
    assert (ckpts / "last.ckpt").read_bytes() == b"precious"


def test_missing_data_file_is_named(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train(tiny_cfg("data=text", f"data.path={tmp_path / 'nowhere.txt'}"))


def test_sft_from_pretrained_model_and_shape_mismatch(tiny_cfg, tmp_path):
    _, first = train(tiny_cfg())
    model_dir = first["run_dir"] / "model"
    metrics, objects = train(tiny_cfg("stage=sft", f"stage.init_from={model_dir}", f"paths.run_dir={tmp_path / 'sft'}"))
    assert objects["tokenizer"].fingerprint() == first["tokenizer"].fingerprint()
    assert metrics["global_step"] == 6
    with pytest.raises(ValueError, match="the checkpoint has model.n_layer=2 but the config asks for model.n_layer=3"):
        train(
            tiny_cfg("stage=sft", f"stage.init_from={model_dir}", "model.n_layer=3", f"paths.run_dir={tmp_path / 'x'}")
        )
    ckpt = first["run_dir"] / "checkpoints" / "last.ckpt"  # a checkpoint works as init_from too
    _, third = train(tiny_cfg("stage=sft", f"stage.init_from={ckpt}", f"paths.run_dir={tmp_path / 'sft2'}"))
    torch.testing.assert_close(
        third["model"].transformer.layers[0].attn.qkv.weight.shape,
        first["model"].transformer.layers[0].attn.qkv.weight.shape,
    )


def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    common = ["model.dropout=0.1", "trainer.val_check_interval=4", "optim.total_steps=12"]
    _, straight = train(tiny_cfg(*common, "trainer.max_steps=12", f"paths.run_dir={tmp_path / 'a'}"))
    train(tiny_cfg(*common, "trainer.max_steps=8", f"paths.run_dir={tmp_path / 'b'}"))
    _, resumed = train(
        tiny_cfg(*common, "trainer.max_steps=12", f"resume={tmp_path / 'b'}", f"paths.run_dir={tmp_path / 'c'}")
    )
    assert resumed["trainer"].global_step == 12
    for (name, a), (_, b) in zip(straight["model"].named_parameters(), resumed["model"].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_last_checkpoint_is_the_newest_step_even_when_the_best_is_older(tiny_cfg):
    # "best" = the highest val/loss: the first validation, so the monitored checkpoint never improves after it
    _, objects = train(tiny_cfg("callbacks.checkpoint.mode=max", "trainer.val_check_interval=2"))
    ckpts = objects["run_dir"] / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"best-2.ckpt", "last.ckpt"}
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6


def test_resume_last_finds_newest_run(tiny_cfg, tmp_path):
    from neuraflux.train import resolve_resume

    with pytest.raises(FileNotFoundError, match="resume=last: no"):
        resolve_resume("last", tmp_path, "pretrain")
    old = tmp_path / "pretrain" / "2026-01-01_00-00-00" / "checkpoints"
    new = tmp_path / "pretrain" / "2026-01-02_00-00-00" / "checkpoints"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "last.ckpt").write_bytes(b"x")
    assert resolve_resume("last", tmp_path, "pretrain") == new / "last.ckpt"


def run_cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


CLI_TINY = [
    "debug=tiny",
    "model.n_layer=1",
    "model.block_size=32",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "curriculum=none",
]


def test_cfg_job_prints_composed_config():
    out = run_cli("--cfg", "job", "optim.lr=0.002")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.002" in out.stdout and "_target_: neuraflux.stages.lm.CausalLMStage" in out.stdout


def test_unknown_stage_lists_the_options():
    out = run_cli("stage=bogus")
    assert out.returncode != 0
    assert "Could not find 'stage/bogus'" in out.stderr and "pretrain" in out.stderr and "sft" in out.stderr


@pytest.mark.slow
def test_multirun_runs_two_jobs(tmp_path):
    out = run_cli("-m", "optim.lr=1e-3,3e-3", f"paths.output_dir={tmp_path}", *CLI_TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = sorted(tmp_path.glob("multirun/*/*/metrics.json"))
    assert len(metrics) == 2
    lrs = sorted(json.loads((m.parent / "config.yaml").read_text().split("lr: ")[1].split("\n")[0]) for m in metrics)
    assert lrs == [1e-3, 3e-3]
    # the sweep ends with a table of its jobs and names the best (the lowest val/loss, what train.py returns)
    (summary_file,) = tmp_path.glob("multirun/*/summary.json")
    summary = json.loads(summary_file.read_text())
    losses = {str(m.parent): json.loads(m.read_text())["val/loss"] for m in metrics}
    assert [j["overrides"][0] for j in summary["jobs"]] == ["optim.lr=0.001", "optim.lr=0.003"]  # as Hydra wrote them
    assert {j["run_dir"]: j["objective"] for j in summary["jobs"]} == pytest.approx(losses)
    assert summary["best"]["run_dir"] == min(losses, key=losses.get)
    assert "multirun: 2 jobs" in out.stdout and f"best: job {summary['best']['job']} (optim.lr=" in out.stdout


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    out = run_cli(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.output_dir={tmp_path}",
        *CLI_TINY,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("pretrain/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["ranks_in_sync"] is True and metrics["global_step"] == 4


def test_masked_lm_loss_equals_the_full_logits_loss_in_value_and_gradient():
    from neuraflux.stages.lm import lm_loss, masked_lm_loss

    torch.manual_seed(0)
    model = small_lm(50, 16)
    ids, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    loss_mask = torch.zeros(3, 12, dtype=torch.bool)
    loss_mask[0, 7:] = True
    loss_mask[2, 3:5] = True  # row 1 has no supervised token: it adds nothing to either form
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, :4] = 0
    full = lm_loss(model(ids, attention_mask), targets, loss_mask)
    full_grads = grads_of(model, full)
    picked = masked_lm_loss(model, ids, targets, loss_mask, attention_mask)
    picked_grads = grads_of(model, picked)
    assert picked.item() == pytest.approx(full.item(), rel=1e-6)
    for n, g in full_grads.items():
        torch.testing.assert_close(picked_grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    # every position supervised (pretraining) takes the full-logits path
    everything = torch.ones_like(loss_mask)
    assert masked_lm_loss(model, ids, targets, everything).item() == pytest.approx(
        lm_loss(model(ids), targets, everything).item(), rel=1e-6
    )
    # no supervised token at all: zero loss with a graph, not NaN
    none = masked_lm_loss(model, ids, targets, torch.zeros_like(loss_mask))
    none.backward()
    assert none.item() == 0.0


def test_per_step_metrics_are_computed_exactly_on_the_steps_lightning_writes(tiny_cfg):
    # is_logging_step reads public trainer state; if it disagreed with Lightning's rule, train/loss would be
    # computed on steps whose values are dropped and missing from the steps that are written
    _, objects = train(tiny_cfg("trainer.log_every_n_steps=2", "trainer.max_steps=6", "trainer.val_check_interval=6"))
    acc = EventAccumulator(str(objects["run_dir"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3, 5]
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 3, 5]


def test_bf16_mixed_clips_a_fused_adamw(tiny_cfg, tmp_path):
    """trainer.precision=bf16-mixed with gradient clipping trains with the fused AdamW (Lightning refused to clip a
    fused optimizer under any mixed precision), and the clipping acts: from the same start, one step clipped to a
    norm of 1e-12 (Adam's first update g / (|g| + eps) all but vanishes) ends about lr away from one unclipped
    (every weight moves by about lr). 16-mixed, whose gradient scaler would unscale after the clip, keeps the foreach
    kernel and refuses optim.fused=true."""

    def one_step(*overrides):
        cfg = tiny_cfg(
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=1",
            "optim.weight_decay=0",
            "optim.warmup_steps=0",
            *overrides,
        )
        metrics, objects = train(cfg)
        assert objects["trainer"].optimizers[0].defaults["fused"] is True
        assert math.isfinite(metrics["train/loss"])
        return objects["model"].transformer.layers[0].mlp.fc.weight.detach(), cfg.optim.lr

    free, lr = one_step(f"paths.run_dir={tmp_path}/free")
    clipped, _ = one_step("trainer.gradient_clip_val=1e-12", f"paths.run_dir={tmp_path}/clipped")
    assert 0.9 < (free - clipped).abs().median().item() / lr < 1.1
    with pytest.raises(ValueError, match="optim.fused=true cannot train with trainer.precision=16-mixed"):
        train(tiny_cfg("trainer.precision=16-mixed", "optim.fused=true", f"paths.run_dir={tmp_path}/fused"))
