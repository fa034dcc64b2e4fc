import torch

from neuraflux.cli import main
from neuraflux.model import NanoConfig, NanoLM, generate
from neuraflux.tokenizer import NanoTokenizer


def test_generate_streams_the_greedy_continuation(tmp_path, capsys):
    tok = NanoTokenizer.train(["the cat sat on the mat. " * 20], 0, mode="char")
    torch.manual_seed(0)
    model = NanoLM(NanoConfig(vocab_size=64, block_size=32, max_position_embeddings=64, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    expected = generate(model.eval(), torch.tensor([tok.encode("the ")]), 12, temperature=0, eos_token_id=tok.eos_id)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == "the " + tok.decode(expected[0, 4:], skip_special_tokens=True) + "\n"


def test_missing_model_is_named(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit, match="no-such-dir"):
        main(["generate", "--model", str(tmp_path / "no-such-dir"), "--prompt", "x"])


def test_serve_subcommand_reaches_the_server_and_names_a_missing_model(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["serve", "--model", str(tmp_path / "no-model-here")])
    assert err.value.code != 0
    assert "no-model-here" in capsys.readouterr().err + str(err.value.code)
