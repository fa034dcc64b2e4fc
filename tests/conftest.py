"""Fixtures: configs composed from the real conf/ tree, with every output in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))

from neuraflux.stages.schema import register  # noqa: E402

register()  # the stages' structured configs (stage.module), as train.py does before composing

# Small enough for a few seconds a stage on 2 cores: conf/debug/tiny.yaml.
TINY = ["debug=tiny"]


def compose_cfg(tmp_path: Path, *overrides: str, tiny: bool = True):
    """The real config, composed as `python train.py OVERRIDES` would, writing under tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *(TINY if tiny else []),
                f"paths.output_dir={tmp_path}",
                f"paths.run_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides, **kw: compose_cfg(tmp_path, *overrides, **kw)


@pytest.fixture
def one_thread():
    """One torch thread for a test (`pytestmark = pytest.mark.usefixtures("one_thread")`): two threads on two
    shared, busy cores run the tiny models several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_lm(vocab_size: int, positions: int):
    """A 2-layer, 16-wide NanoLM without dropout, for comparing two ways of computing one loss."""
    from neuraflux.model import NanoConfig, NanoLM

    return NanoLM(
        NanoConfig(
            vocab_size=vocab_size,
            block_size=positions,
            max_position_embeddings=positions,
            n_layer=2,
            n_head=2,
            n_embd=16,
            dropout=0.0,
        )
    )


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backpropagate `loss` and return a copy of every parameter's gradient, leaving the model's grads zeroed."""
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.fixture
def decoded_prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids (first row) of every `neuraflux.model.generate_stream` call the test makes, in order."""
    import neuraflux.model

    seen: list[list[int]] = []
    real = neuraflux.model.generate_stream

    def recording(model, ids, *args, **kwargs):
        seen.append(ids[0].tolist())
        yield from real(model, ids, *args, **kwargs)

    monkeypatch.setattr(neuraflux.model, "generate_stream", recording)
    return seen
