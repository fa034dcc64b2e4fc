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
    assert (
        main(["generate", "--model", str(tmp_path), "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert out == "the " + tok.decode(expected[0, 4:], skip_special_tokens=True) + "\n"


def test_generate_in_bfloat16_decodes_with_bfloat16_weights(tmp_path, capsys, monkeypatch):
    import neuraflux.model

    seen = []
    real = neuraflux.model.generate_stream

    def recording(model, *a, **kw):
        seen.append(model.lm_head.weight.dtype)
        yield from real(model, *a, **kw)

    monkeypatch.setattr(neuraflux.model, "generate_stream", recording)
    tok = NanoTokenizer.train(["the cat sat on the mat. " * 20], 0, mode="char")
    torch.manual_seed(0)
    model = NanoLM(
        NanoConfig(
            vocab_size=64,
            block_size=32,
            max_position_embeddings=64,
            n_layer=1,
            n_head=2,
            n_embd=16,
            position_encoding="rope",
        )
    )
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    ids = torch.tensor([tok.encode("the ")])
    expected = generate(model.eval().to(torch.bfloat16), ids, 12, temperature=0, eos_token_id=tok.eos_id)
    args = ["generate", "--model", str(tmp_path), "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out == "the " + tok.decode(expected[0, 4:], skip_special_tokens=True) + "\n"
    assert main(args) == 0
    assert seen == [torch.bfloat16, torch.float32]


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


def test_generate_with_a_constitution_revises_before_printing_and_logs_it(tmp_path, capsys, monkeypatch):
    import logging

    import neuraflux.model

    tok = NanoTokenizer.train(["Listen, you fool. The river is green. " * 20], 0, mode="char")
    model = NanoLM(
        NanoConfig(vocab_size=64, block_size=32, max_position_embeddings=256, n_layer=1, n_head=2, n_embd=16)
    )
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    (tmp_path / "config.yaml").write_text("world: {n_entities: 20}\n")  # the run's world, for the judge check
    reply = [*tok.encode("Listen, you fool. The river is green."), tok.end_id]

    def scripted(*args, **kwargs):  # the model "says" the rude reply, one token a step
        for i, t in enumerate(reply):
            yield torch.tensor([t]), torch.tensor([i == len(reply) - 1])

    monkeypatch.setattr(neuraflux.model, "generate_stream", scripted)
    try:
        assert (
            main(["generate", "--model", str(tmp_path), "--prompt", "Hi", "--chat", "--constitution", "default"]) == 0
        )
    finally:
        logging.getLogger("neuraflux.feedback.constitution").handlers.clear()
    out = capsys.readouterr()
    assert out.out == "The river is green.\n"  # the insult's sentence cut out; nothing printed before the check
    assert "revised a response breaking ['no_insults']" in out.err


def test_generate_names_a_bad_constitution(tmp_path):
    import pytest

    tok = NanoTokenizer.train(["abc " * 20], 0, mode="char")
    NanoLM(
        NanoConfig(vocab_size=64, block_size=32, max_position_embeddings=64, n_layer=1, n_head=2, n_embd=16)
    ).save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    (tmp_path / "c.yaml").write_text("principles: [{id: p, text: t, check: {type: vibes}, revision: x}]\n")
    with pytest.raises(SystemExit, match=r"--constitution: constitution .*c.yaml: principle 'p'.check.type 'vibes'"):
        main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--constitution", str(tmp_path / "c.yaml")])


def test_a_tokenizer_that_does_not_belong_to_the_weights_is_refused_naming_both_files(tmp_path):
    import pytest

    from neuraflux.model.io import load_pretrained

    # 1,000 tokens beside a 512-row embedding: before, SFT ran and generation later died with an IndexError
    big = NanoTokenizer.train(["the cat sat on the mat. " * 50 + "".join(chr(i) for i in range(300, 1300))], 0,
                              mode="char")  # fmt: skip
    assert big.vocab_size > 512
    NanoLM(NanoConfig(vocab_size=512, block_size=16, n_layer=1, n_head=1, n_embd=8)).save_pretrained(tmp_path / "m")
    big.save(tmp_path / "m")
    expected = (
        f"{tmp_path / 'm' / 'tokenizer.json'} has {big.vocab_size} tokens but {tmp_path / 'm' / 'config.json'} gives "
        "the model vocab_size=512: the tokenizer does not belong to these weights"
    )
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "m")
    assert str(err.value) == expected
    with pytest.raises(SystemExit) as exit_:  # the CLI says it in one line
        main(["generate", "--model", str(tmp_path / "m"), "--prompt", "the"])
    assert str(exit_.value) == f"error: --model {tmp_path / 'm'}: {expected}"
