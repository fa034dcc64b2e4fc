"""bench/machine.py's advice on bf16: a CPU without bf16 matmuls gets a recommendation, not a slowdown as a result."""

import importlib.util
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


def test_the_throughput_bench_on_a_cpu_without_bf16_says_so_and_measures_nothing(monkeypatch, capsys):
    """`bench/train_throughput.py --precision bf16-mixed` where the CPU flags lack AMX and AVX512-BF16: the
    recommendation is printed and no run starts (a bf16 slowdown is not reported as a result)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench_spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    bench = importlib.util.module_from_spec(bench_spec)
    monkeypatch.setitem(sys.modules, "train_throughput", bench)  # its dataclasses look their module up there
    bench_spec.loader.exec_module(bench)
    monkeypatch.setattr(sys.modules["machine"], "cpu_flags", lambda: set(NO_BF16))

    def no_run(*args, **kwargs):
        raise AssertionError("a bf16 run started on a CPU without bf16 matmuls")

    monkeypatch.setattr(bench, "framework_run", no_run)
    monkeypatch.setattr(bench, "plain_loop", no_run)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--precision", "bf16-mixed", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "so train with trainer.precision=32-true on it; bf16-mixed not measured" in out
    assert "lacks: amx_bf16" in out  # the flags line says which machine this was
