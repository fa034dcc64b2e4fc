"""bench/gpu_recipe.py's plumbing on the CPU (`--smoke`: the GPU script's code path at tiny sizes), and its refusal
without a GPU. No figure it prints here means anything; the recipe's figures need a GPU (docs/BENCHMARKS.md)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_recipe.py"


@pytest.fixture
def text(tmp_path):
    """A small character-level corpus: 50 distinct lines, so the val tenth holds text the model has not seen."""
    path = tmp_path / "text.txt"
    path.write_text("".join(f"Line {i}: to be, or not to be, that is the question {i * 7 % 13}.\n" for i in range(50)))
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_and_names_the_smoke_mode():
    proc = run_script("--part", "ours")
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "--smoke" in proc.stderr


def test_smoke_runs_ours_and_nanogpts_full_runs(text, tmp_path):
    out = tmp_path / "results.json"
    proc = run_script("--smoke", "--part", "ours,reference", "--data", str(text), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ours, ref = results["ours"], results["reference"]
    # 12 steps validated every 6: two validations; nanoGPT's loop evaluates at 0, 6 and 12
    assert ours["validations"] == 2 and math.isfinite(ours["val_loss_best"])
    assert math.isfinite(ref["val_exact"]) and ref["val_estimate_best"] <= ref["val_estimate_final"]
    assert ours["tokens_per_sec"] > 0 and ref["tokens_per_sec"] > 0 and ours["mfu"] is None  # no peak on a CPU
    assert "published 1.4697" in proc.stdout


@pytest.mark.slow
def test_smoke_clocks_ours_and_nanogpts_loop_eager_and_compiled(text, tmp_path):
    out = tmp_path / "results.json"
    proc = run_script("--smoke", "--part", "throughput", "--data", str(text), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["throughput"]
    assert set(rows) == {f"{who}, {how}" for who in ("ours", "nanoGPT") for how in ("eager", "compiled")}
    assert all(row["tokens_per_sec"] > 0 for row in rows.values())
