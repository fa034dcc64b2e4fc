import pytest
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


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "nan", "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
        ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
        ("--temperature", "-0.5", "--temperature must be a finite number >= 0 (0 is greedy), got -0.5"),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
        ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
        ("--top-p", "nan", "--top-p must be in (0, 1], got nan"),
        ("--top-k", "0", "--top-k must be a positive integer, got 0"),
        ("--max-new-tokens", "0", "--max-new-tokens must be a positive integer, got 0"),
        ("--max-new-tokens", "-3", "--max-new-tokens must be a positive integer, got -3"),
        ("--prompt", "", "--prompt is empty: give the text to continue (with --chat, the user's message)"),
    ],
)
def test_generate_refuses_a_meaningless_argument_in_one_line_before_loading_the_model(tmp_path, flag, value, message):
    # no model at that path: an argument checked only after loading would be reported as a missing --model instead
    # (before, nan reached the sampler and --max-new-tokens 0 printed the prompt back as if it were an answer)
    args = ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "the river", flag, value]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == f"error: {message}"


def test_a_meaningless_generate_argument_is_one_stderr_line_and_exit_status_1(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "neuraflux.cli", "generate", "--model", str(tmp_path), "--prompt", "hi",
         "--temperature", "nan"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (out.returncode, out.stdout, out.stderr) == (
        1,
        "",
        "error: --temperature must be a finite number >= 0 (0 is greedy), got nan\n",
    )


def test_generate_slides_past_the_context_and_says_when_it_cuts_the_prompt(tmp_path, capsys):
    import torch

    from neuraflux.model import generate
    from tests.test_serve_engine import tiny_lm

    model, tok = tiny_lm(max_positions=64)  # greedy: one printable character per token, never a stop token
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--temperature", "0", "--max-new-tokens", "150"]
    assert main([*args, "--prompt", "the cat "]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # the prompt fits: nothing to say
    text = captured.out[len("the cat ") : -1]
    assert len(text) == 150  # more than the 64 positions the model has
    # the first round is plain greedy decoding of the prompt (64 positions: rounds of 32 tokens)
    first = generate(model.eval(), torch.tensor([tok.encode("the cat ")]), 32, temperature=0)[0, 8:]
    assert text[:32] == tok.decode(first.tolist())
    # the second round reads the last 32 tokens written so far, as a fresh prompt would, and writes 32 more
    second = generate(model, torch.tensor([tok.encode(text[:32])]), 32, temperature=0)[0, 32:]
    assert text[32:64] == tok.decode(second.tolist())
    assert main([*args, "--prompt", "a" * 100, "--max-new-tokens", "4"]) == 0
    assert (
        capsys.readouterr().err
        == "note: the prompt is 100 tokens and the model reads 64 at a time: it sees the last 60 of them\n"
    )


def test_generate_with_docs_answers_with_the_retrieved_context_and_names_its_sources(tmp_path, capsys, decoded_prompts):
    from neuraflux.chat import Message, render_prompt
    from tests.test_serve_engine import tiny_lm

    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    (tmp_path / "zorn.txt").write_text("the tower of zorn is tall\n")
    (tmp_path / "bread.txt").write_text("bread is baked\n")
    seen = decoded_prompts
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "how tall is zorn?", "--max-new-tokens", "3"]
    assert main([*args, "--chat", "--docs", str(tmp_path / "zorn.txt"), str(tmp_path / "bread.txt"), "--k", "1"]) == 0
    expected = render_prompt([Message("user", "how tall is zorn?")], context="the tower of zorn is tall")
    assert seen[0] == tok.encode(expected)  # the question with the top document as its context turn
    assert capsys.readouterr().err.startswith(f"source [{tmp_path / 'zorn.txt'}#0] the tower of zorn is tall")
    with pytest.raises(SystemExit, match="error: --docs, --world and --store need --chat"):
        main([*args, "--world"])
