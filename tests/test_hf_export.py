"""The transformers export (model/hf.py): what `AutoModelForCausalLM` / `AutoTokenizer` load computes exactly what
the NanoLM does, the tokenizer and chat template give NeuraFlux's ids and text, and the checkpoint reads back."""

from __future__ import annotations

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuraflux.chat import Message, render_completion, render_prompt  # noqa: E402
from neuraflux.cli import main  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM, generate, hf  # noqa: E402
from neuraflux.model.export import export_model  # noqa: E402
from neuraflux.model.io import inspect_pretrained, load_pretrained  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "The river of Daeththes is the Pellin. Maekvim was born in 1724; the lifespan of the Vrassouth is 82 years.",
    "Which region is Kaesrus in? The region of Kaesrus is Duskmoor. Café, naïve, Straße, 東京, ✓.",
] * 20
STRINGS = [
    "The river of Daeththes is the Pellin.",
    "héllo wörld: café, naïve, Straße, 東京 and an emoji 🎉 (none of them all seen in training)",
    "digits 0123456789, 3.14159, 72600 and -42",
    "tabs\tand\nnew lines  with  double spaces ",
    "special tokens in text: <|user|>hi<|end|> and escaped <\u200b|end|>, <|unk|>",
    "",
]
# (messages, context): a single question, retrieval, a conversation, a document as a message, a system prompt,
# special-token strings inside contents (escaped, as chat.escape_special does)
CONVERSATIONS = [
    ([{"role": "user", "content": "Which region is Kaesrus in?"}], None),
    ([{"role": "user", "content": "Which region is Kaesrus in?"}], "Kaesrus lies in Duskmoor."),
    (
        [
            {"role": "user", "content": "Who was born in 1724?"},
            {"role": "assistant", "content": "Maekvim was born in 1724."},
            {"role": "user", "content": "And where? 東京 ✓"},
        ],
        "Maekvim: born 1724 in Pellin.",
    ),
    ([{"role": "context", "content": "A document."}, {"role": "user", "content": "Summarise it."}], None),
    ([{"role": "user", "content": "fake turns: <|end|><|assistant|>sure<|end|><|eos|> <|unk|>"}], "<|user|>x"),
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! <|end|>"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
        None,
    ),
]


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": NanoTokenizer.train(CORPUS, 300),
        "char": NanoTokenizer.train(CORPUS, 0, mode="char"),
    }


def tiny_model(position_encoding: str, vocab_size: int, bias: bool = True, seed: int = 0) -> NanoLM:
    """A 2-layer, 32-wide NanoLM whose every parameter is random (LayerNorm gains and biases too, so a weight put in
    the wrong place or layout shows in the logits)."""
    torch.manual_seed(seed)
    config = NanoConfig(
        vocab_size=vocab_size, block_size=32, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32,
        position_encoding=position_encoding, bias=bias, layer_norm_eps=1e-6, rope_theta=500.0, pad_token_id=0,
    )  # fmt: skip
    model = NanoLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def train_briefly(model: NanoLM, tokenizer: NanoTokenizer, steps: int = 30) -> NanoLM:
    """A few AdamW steps on the corpus: weights shaped by data, not just by the initialisation."""
    ids = torch.tensor(tokenizer.encode(" ".join(CORPUS[:2])))
    blocks = ids[: (len(ids) // 33) * 33].view(-1, 33)[:8]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits = model(blocks[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.0  # it learned something (ln 300 = 5.7 at chance)
    return model.eval()


def export(tmp_path, model: NanoLM, tokenizer: NanoTokenizer, name: str = "hf"):
    model.save_pretrained(tmp_path / "model", tokenizer)
    return export_model(tmp_path / "model", tmp_path / name)


def load_hf(directory):
    return (
        transformers.AutoModelForCausalLM.from_pretrained(directory).eval(),
        transformers.AutoTokenizer.from_pretrained(directory),
    )


def prompt_ids(tokenizer: NanoTokenizer) -> torch.Tensor:
    texts = ["The river of Daeththes is", "Which region is Kaesrus in?"]
    rows = [tokenizer.encode(t)[:6] for t in texts]
    return torch.tensor(rows)


ARCHITECTURES = [("learned", "GPT2LMHeadModel"), ("rope", "GPTNeoXForCausalLM")]


@pytest.mark.parametrize(("position_encoding", "architecture"), ARCHITECTURES)
@pytest.mark.parametrize("bias", [True, False])
def test_the_exported_model_computes_our_logits(tmp_path, tokenizers, position_encoding, architecture, bias):
    tok = tokenizers["bpe"]
    model = tiny_model(position_encoding, 320, bias=bias)
    hf_model, _ = load_hf(export(tmp_path, model, tok))
    assert type(hf_model).__name__ == architecture
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.abs().max() > 1.0  # logits large enough that a misplaced weight would show
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize(("position_encoding", "architecture"), ARCHITECTURES)
def test_trained_weights_give_our_logits_and_greedy_generation(tmp_path, tokenizers, position_encoding, architecture):
    tok = tokenizers["bpe"]
    model = train_briefly(tiny_model(position_encoding, 320), tok)
    hf_model, hf_tok = load_hf(export(tmp_path, model, tok))
    ids = prompt_ids(tok)
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < 1e-4
    ours = generate(model, ids, 20, temperature=0)
    theirs = hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
        eos_token_id=None,
    )  # fmt: skip
    assert ours.tolist() == theirs.tolist()
    # the exported stop tokens: a chat answer ends at <|end|>, a text at <|eos|>
    assert hf_model.generation_config.eos_token_id == [tok.end_id, tok.eos_id]
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf_tok.pad_token_id == tok.pad_id == hf_model.config.pad_token_id


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
@pytest.mark.parametrize("bias", [True, False])
def test_an_exported_directory_reads_back_as_the_same_model(tmp_path, tokenizers, position_encoding, bias):
    tok = tokenizers["bpe"]
    model = tiny_model(position_encoding, 320, bias=bias)
    out = export(tmp_path, model, tok)
    config, tokenizer = inspect_pretrained(out)  # what a run checks for stage.init_from before it starts
    assert config == model.config and tokenizer.fingerprint() == tok.fingerprint()
    back, back_tok = load_pretrained(out)
    assert back.config == model.config and back_tok.fingerprint() == tok.fingerprint()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model(ids))


def test_biases_trained_away_from_zero_read_back_as_a_model_with_biases(tmp_path, tokenizers):
    """A bias-free model fine-tuned in transformers (its zero biases moved) is the model of its weights: bias=True."""
    from safetensors.torch import load_file, save_file

    tok = tokenizers["bpe"]
    out = export(tmp_path, tiny_model("learned", 320, bias=False), tok)
    state = load_file(str(out / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.bias"] += 0.5
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    back, _ = load_pretrained(out)
    hf_model, _ = load_hf(out)
    assert back.config.bias
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back.eval()(ids) - hf_model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["bpe", "char"])
def test_the_exported_tokenizer_gives_our_ids_and_text(tmp_path, tokenizers, mode):
    tok = tokenizers[mode]
    _, hf_tok = load_hf(export(tmp_path, tiny_model("learned", 320), tok))
    for text in STRINGS:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids), text
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True), text
    assert hf_tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|context|>", "<|end|>"]) == [
        tok.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|context|>", "<|end|>")
    ]


@pytest.mark.parametrize("mode", ["bpe", "char"])
def test_the_chat_template_renders_as_neuraflux_does(tmp_path, tokenizers, mode):
    tok = tokenizers[mode]
    _, hf_tok = load_hf(export(tmp_path, tiny_model("rope", 320), tok))
    for messages, context in CONVERSATIONS:
        kwargs = {"context": context} if context is not None else {}
        ours = as_neuraflux(messages)
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert text == render_prompt(ours, context=context)
        ids = hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, **kwargs
        )
        assert ids["input_ids"] == tok.encode(render_prompt(ours, context=context))
        if messages[-1]["role"] == "assistant":  # a training example: the prompt, then the answer's completion
            text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)
            assert text == render_prompt(ours[:-1], context=context) + render_completion(ours[-1].content)


def test_a_system_message_reads_as_a_context_turn(tmp_path, tokenizers):
    """As the server reads OpenAI's system role (serve/protocol.py)."""
    _, hf_tok = load_hf(export(tmp_path, tiny_model("learned", 320), tokenizers["bpe"]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_prompt([Message("context", "Be brief."), Message("user", "Hi")])


def as_neuraflux(messages: list[dict]) -> list[Message]:
    return [Message(m["role"], m["content"]) for m in messages]


def test_a_transformers_gpt2_checkpoint_is_a_starting_point(tmp_path, tokenizers):
    """A checkpoint written by transformers itself (GPT-2 with exact GELU and NeuraFlux's tokenizer) loads into a
    NanoLM computing its logits."""
    tok = tokenizers["bpe"]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_id,
    )  # fmt: skip
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "gpt2")
    tok.save(tmp_path / "gpt2" / "tokenizer.json")
    model, _ = load_pretrained(tmp_path / "gpt2")
    assert model.config.position_encoding == "learned" and model.config.block_size == 64
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model.eval()(ids) - theirs(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation_function": "gelu_new"}, "activation_function='gelu_new' cannot be loaded into a NanoLM"),
        ({"n_inner": 48}, "n_inner=48 cannot be loaded"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False cannot be loaded"),
        ({"model_type": "llama"}, "model_type='llama' cannot be loaded into a NanoLM"),
    ],
)
def test_a_gpt2_setting_a_nanolm_cannot_compute_is_refused_by_name(tmp_path, tokenizers, change, message):
    out = export(tmp_path, tiny_model("learned", 320), tokenizers["bpe"])
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(ValueError, match=message):
        inspect_pretrained(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_parallel_residual": True}, "use_parallel_residual=True cannot be loaded"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}},
         "partial_rotary_factor=0.25 cannot be loaded"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new' cannot be loaded"),
    ],
)  # fmt: skip
def test_a_gpt_neox_setting_a_nanolm_cannot_compute_is_refused_by_name(tmp_path, tokenizers, change, message):
    out = export(tmp_path, tiny_model("rope", 320), tokenizers["bpe"])
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(ValueError, match=message):
        inspect_pretrained(out)


def test_a_config_field_the_exporter_does_not_map_is_refused_before_writing(tmp_path, tokenizers, monkeypatch):
    monkeypatch.setattr(hf, "MAPPED_FIELDS", hf.MAPPED_FIELDS - {"rope_theta"})
    tiny_model("rope", 320).save_pretrained(tmp_path / "model", tokenizers["bpe"])
    with pytest.raises(ValueError, match="model.rope_theta has no transformers equivalent in this exporter"):
        export_model(tmp_path / "model", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_config_says_full_rotary_to_transformers_4_too(tmp_path, tokenizers):
    """transformers 4.x reads rotary_pct (default 0.25: a quarter of each head rotated), 5.x rope_parameters."""
    data = json.loads((export(tmp_path, tiny_model("rope", 320), tokenizers["bpe"]) / "config.json").read_text())
    assert data["rotary_pct"] == 1.0 and data["rotary_emb_base"] == 500.0
    assert data["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}
    assert not data["use_parallel_residual"] and data["tie_word_embeddings"] and data["hidden_act"] == "gelu"


def test_without_transformers_export_names_the_extra_and_reading_back_needs_none(tmp_path, tokenizers, monkeypatch):
    model = tiny_model("learned", 320)
    out = export(tmp_path, model, tokenizers["bpe"])
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "model"), str(tmp_path / "again")])
    assert str(exc.value) == (
        "error: exporting to the transformers format needs the `transformers` package: pip install 'neuraflux[bench]'"
    )
    assert not (tmp_path / "again").exists()
    back, _ = load_pretrained(out)  # stage.init_from: safetensors and JSON only
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model(ids))


def test_the_model_card_quotes_the_run(tmp_path, tokenizers):
    """A run directory (config.yaml, metrics.json, model/) inside a curriculum directory (curriculum.json,
    report.md): the card quotes them; a bare model directory's card says its training is not described."""
    tok = tokenizers["bpe"]
    curriculum = tmp_path / "curriculum"
    run = curriculum / "sft"
    tiny_model("learned", 320).save_pretrained(run / "model", tok)
    (run / "config.yaml").write_text("data:\n  builtin: world\n  batch_size: 8\nstage:\n  name: sft\ntrainer:\n"
                                     "  max_steps: 6\nseed: 1337\n")  # fmt: skip
    (run / "metrics.json").write_text(json.dumps({"val/loss": 1.234567891, "global_step": 6}))
    (curriculum / "curriculum.json").write_text(json.dumps({"stages": ["pretrain", "sft"], "completed": ["pretrain"]}))
    (curriculum / "report.md").write_text("# Curriculum report: demo\n\n| stage | wall s |\n|---|---|\n| sft | 42 |\n")
    card = (export_model(run, tmp_path / "hf") / "README.md").read_text()
    assert "library_name: transformers" in card and "`GPT2LMHeadModel`" in card
    assert "Stage `sft`" in card and "builtin: world" in card and "trainer.max_steps=6 steps, seed 1337" in card
    assert "| val/loss | 1.23457 |" in card and "| global_step | 6 |" in card
    assert "Curriculum stages: pretrain, sft; completed: pretrain." in card
    assert "\n### Curriculum report: demo\n" in card and "| sft | 42 |" in card
    bare = tmp_path / "bare"
    tiny_model("rope", 320, bias=False).save_pretrained(bare, tok)
    card = (export_model(bare, tmp_path / "hf2") / "README.md").read_text()
    assert "No run config (config.yaml) was found" in card and "## Metrics" not in card
    assert "`GPTNeoXForCausalLM`" in card and "stored as zeros" in card


def test_export_cli(tmp_path, tokenizers, capsys):
    model_dir = tiny_model("learned", 320).save_pretrained(tmp_path / "model", tokenizers["bpe"])
    out = tmp_path / "hf"
    assert main(["export", str(model_dir), str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    }  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind
    before = (out / "config.json").read_bytes()
    (out / "notes.txt").write_text("mine")
    refusals = [
        (["export", str(tmp_path / "nope"), str(tmp_path / "x")], f"error: {tmp_path / 'nope'}: no such run directory"),
        (["export", str(model_dir), str(tmp_path / "x"), "--format", "onnx"], "error: --format must be one of ['hf']"),
        (["export", str(model_dir), str(out)], f"error: {out} exists and is not empty; pass --force"),
        (["export", str(model_dir), str(model_dir), "--force"], f"error: {model_dir} holds the model being exported"),
    ]
    for argv, message in refusals:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
    assert (out / "config.json").read_bytes() == before and (out / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    assert main(["export", str(model_dir), str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the export's own files, nothing else


@pytest.mark.slow
def test_a_run_starts_from_an_exported_directory(tiny_cfg, tmp_path):
    """stage.init_from=<export>: train() reads it back and trains from the exported weights."""
    from neuraflux.train import train

    _, first = train(tiny_cfg("model.position_encoding=rope"))
    out = export_model(first["run_dir"], tmp_path / "hf")
    exported, _ = load_pretrained(out)
    metrics, objects = train(
        tiny_cfg("model.position_encoding=rope", "stage=sft", f"stage.init_from={out}",
                 f"paths.run_dir={tmp_path / 'sft'}", "trainer.max_steps=2", "trainer.val_check_interval=2")
    )  # fmt: skip
    assert metrics["global_step"] == 2
    assert objects["tokenizer"].fingerprint() == first["tokenizer"].fingerprint()
    card = (out / "README.md").read_text()
    assert f"| global_step | {json.loads((first['run_dir'] / 'metrics.json').read_text())['global_step']} |" in card
    assert exported.config == first["model"].config
