"""bench/machine.py's advice on bf16: a CPU without bf16 matmuls gets a recommendation, not a slowdown as a result."""

import importlib.util
import subprocess
import sys

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_machine", ROOT / "bench" / "machine.py")
machine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(machine)

AMX = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"}
NO_BF16 = {"avx512f", "avx512_vnni", "avx2"}


def test_with_bf16_matmuls_every_precision_is_measured():
    assert machine.bf16_worth_measuring(["32-true", "bf16-mixed"], flags=AMX) == (["32-true", "bf16-mixed"], None)
    assert machine.bf16_worth_measuring(["bf16-mixed"], flags={"avx512_bf16"}) == (["bf16-mixed"], None)


def test_without_them_bf16_is_left_out_and_float32_recommended():
    kept, line = machine.bf16_worth_measuring(["32-true", "bf16-mixed", "bf16-true"], flags=NO_BF16)
    assert kept == ["32-true"]
    assert "neither AMX nor AVX512-BF16" in line and "trainer.precision=32-true" in line
    assert "bf16-mixed bf16-true not measured" in line
    assert machine.bf16_worth_measuring(["bf16-mixed"], flags=NO_BF16)[0] == []
    # float32 alone needs no advice on any CPU
    assert machine.bf16_worth_measuring(["32-true"], flags=NO_BF16) == (["32-true"], None)


def test_the_emulation_is_measured_only_when_asked_and_then_labelled():
    kept, line = machine.bf16_worth_measuring(["32-true", "bf16-mixed"], emulated=True, flags=NO_BF16)
    assert kept == ["32-true", "bf16-mixed"]
    assert "measure the emulation, not bf16" in line


def test_the_throughput_bench_offers_the_emulation_flag():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--emulated-bf16" in out.stdout
