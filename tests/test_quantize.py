"""Int8 quantization (model/quantize.py): what is quantized, how close the logits stay, the saved directory loading
back to the same numbers without re-quantizing, and each refusal in one line."""

import json

import pytest
import torch

pytest.importorskip("torchao")

from neuraflux.cli import main  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM, generate  # noqa: E402
from neuraflux.model import quantize as q  # noqa: E402
from neuraflux.model.io import load_for_inference, load_pretrained  # noqa: E402
from neuraflux.model.nano import KVCache  # noqa: E402
from neuraflux.model.quantize import (  # noqa: E402
    MODES,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
    QuantizationError,
    quantize_model,
    save_quantized,
)
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

TEXT = "the cat sat on the mat. the dog ate the bone. " * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per position encoding, a float model directory (trained once for the module), its tokenizer and ids."""
    root = tmp_path_factory.mktemp("float")
    return {pe: train_model_dir(root, pe) for pe in ("learned", "rope")}


@pytest.fixture
def model_dir(trained, tmp_path):
    """model_dir(tmp_path, position_encoding): a copy of the trained float model in this test's tmp_path."""
    import shutil

    def copy(_, position_encoding="learned"):
        path, tok, ids = trained[position_encoding]
        shutil.copytree(path, tmp_path / path.name)
        return tmp_path / path.name, tok, ids

    return copy


def train_model_dir(tmp_path, position_encoding="learned"):
    """A float model directory with a model briefly trained to predict TEXT (random weights give near-uniform
    logits, where any rounding flips the argmax)."""
    tok = NanoTokenizer.train([TEXT], 0, mode="char")
    torch.manual_seed(0)
    config = NanoConfig(
        vocab_size=64, block_size=32, max_position_embeddings=64, n_layer=2, n_head=2, n_embd=32,
        position_encoding=position_encoding, dropout=0.0,
    )  # fmt: skip
    model = NanoLM(config)
    ids = torch.tensor([tok.encode(TEXT)[:33]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path / f"float-{position_encoding}"
    model.save_pretrained(out, tok)
    return out, tok, ids[:, :-1]


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
@pytest.mark.parametrize("mode", MODES)
def test_every_matrix_is_int8_and_the_logits_stay_close(tmp_path, mode, position_encoding, model_dir):
    path, tok, ids = model_dir(tmp_path, position_encoding)
    reference, _ = load_for_inference(path)
    quantized, _ = load_for_inference(path, mode)
    kinds = {name: type(p).__name__ for name, p in quantized.named_parameters()}
    matrices = [n for n in kinds if n.endswith(".weight") and "ln" not in n and "position" not in n]
    # 2 layers x (qkv, attention out, mlp in, mlp out) + the head + the token table
    assert len(matrices) == 2 * 4 + 2
    assert {kinds[n] for n in matrices} <= {"Int8Tensor", "IntxUnpackedToInt8Tensor"}
    assert kinds["transformer.embeddings.token.weight"] == "IntxUnpackedToInt8Tensor"
    assert kinds["lm_head.weight"] == "Int8Tensor"
    with torch.no_grad():
        want, got = reference(ids), quantized(ids)
    # per-row int8 rounds each weight by at most half a step (|w|max / 254): the logits move by a few percent of
    # their spread, and the trained model's next-token choice survives at (nearly) every position
    spread = want.std().item()
    assert (got - want).abs().max().item() < 0.1 * spread
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


def test_a_fused_layer_is_the_bfloat16_rounding_of_the_exact_product():
    """Int8Linear, by hand: the input rounded to bfloat16, times the int8 rows, computed exactly (in float64 the
    sum of 64 products of 8-bit by 7-bit integers-times-powers-of-two has no rounding), rounded once to bfloat16,
    then scaled and biased. The kernel accumulates in float32 first, which can move a value across a bfloat16
    rounding boundary: at most one bfloat16 step, 2^-7 of the value."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48))
    q.torchao_quantization().quantize_(layer, q.torchao_config("int8"))
    fused = Int8Linear(layer[0])
    x = torch.randn(5, 64)
    weight = layer[0].weight
    exact = x.bfloat16().double() @ weight.qdata.double().t()  # (5, 48)
    scale = weight.scale.double().reshape(-1)
    want = exact.bfloat16().double() * scale + layer[0].bias.double()
    with torch.no_grad():
        got = fused(x).double()
    assert ((got - want).abs() <= 2**-7 * exact.abs() * scale + 1e-6).all()


@torch.no_grad()
def every_position(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) of the uncached forward, and of a KV-cached decode fed ids one token at a time."""
    cache = KVCache.empty(model.config, ids.shape[0], ids.shape[1], "cpu", torch.float32)
    steps = [model.lm_head(model.transformer(ids[:, t : t + 1], kv_cache=cache)) for t in range(ids.shape[1])]
    return model(ids), torch.cat(steps, dim=1)


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
def test_the_fused_kernels_give_torchaos_int8_logits_at_every_position(tmp_path, position_encoding, model_dir):
    """The default kernels against torchao's own (the reference), cached and uncached. Tolerance: one bfloat16 step
    at the largest logit (2^-7 of it). The fused matmul returns bfloat16, so the head alone rounds each logit by
    up to half a step; the bfloat16 inputs of the earlier layers add relative errors of 2^-9 each, which partly
    cancel. (Measured: 0.016 and 0.019 on logits up to 5.9, below the 0.025 that int8 itself moves them from float.)
    The token table's rows are torchao's exactly."""
    path, tok, ids = model_dir(tmp_path, position_encoding)
    reference = q.quantize_model(load_pretrained(path)[0].eval(), "int8", kernel="torchao")
    fused = q.quantize_model(load_pretrained(path)[0].eval(), "int8")
    assert isinstance(fused.lm_head, Int8Linear) and isinstance(fused.transformer.embeddings.token, Int8Embedding)
    assert sum(isinstance(m, Int8Linear) for m in fused.modules()) == 2 * 4 + 1
    want, want_cached = every_position(reference, ids)
    got, got_cached = every_position(fused, ids)
    tolerance = 2**-7 * want.abs().max().item()
    assert (got - want).abs().max().item() < tolerance
    assert (got_cached - want).abs().max().item() < tolerance
    # cached against uncached: the same kernels, but attention's float32 output differs in the last bits between
    # the two paths, which can move a bfloat16 rounding by a step (bench/quantize_quality.py: 0.074 on a trained
    # model's logits up to 16.7); torchao's float path differs by float rounding only
    assert (got_cached - got).abs().max().item() < tolerance
    assert (want_cached - want).abs().max().item() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
    with torch.no_grad():
        table = torch.nn.functional.embedding(ids, reference.transformer.embeddings.token.weight)
        assert torch.equal(fused.transformer.embeddings.token(ids), table)


def test_a_dynamic_layer_is_the_exact_integer_product_of_its_quantized_rows():
    """Int8DynamicLinear, by hand: each input row's scale is max |x| / 127.5, its values round(x / scale) clipped
    to [-128, 127]; the int8 x int8 sums are exact integers (float64 holds them), times the row scale and the
    weight's row scales, plus the bias. Only the float32 rescaling rounds."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(40, 24))  # any width: no multiple-of-16 rule here
    q.torchao_quantization().quantize_(layer, q.torchao_config("int8-dynamic"))
    fused = Int8DynamicLinear(layer[0])
    x = torch.randn(2, 3, 40) * torch.tensor([1.0, 100.0, 1e-3])[:, None]  # rows of very different size
    x[1, 2] = 0.0  # an all-zero row: the scale's floor, float32 eps, keeps it finite
    rows = x.reshape(-1, 40).double()
    scale = (rows.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    ints = torch.clamp(torch.round(rows * (1.0 / scale.float()).double()), -128, 127)
    weight = layer[0].weight
    exact = ints @ weight.qdata.double().t()  # integers below 2**31: no rounding
    want = (exact * scale * weight.scale.double().reshape(-1) + layer[0].bias.double()).reshape(2, 3, 24)
    with torch.no_grad():
        got = fused(x).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert bool((got[1, 2] == layer[0].bias.double()).all())


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
def test_the_fused_dynamic_layers_give_torchaos_int8_dynamic_logits_at_every_position(
    tmp_path, position_encoding, model_dir
):
    """int8-dynamic's fused layers do torchao's arithmetic op for op (row scales, rounding, int32 sums, the same
    float32 rescaling in the same order), so every logit is torchao's exactly, cached and uncached, and a saved
    directory loads back onto them."""
    path, tok, ids = model_dir(tmp_path, position_encoding)
    reference = q.quantize_model(load_pretrained(path)[0].eval(), "int8-dynamic", kernel="torchao")
    fused = q.quantize_model(load_pretrained(path)[0].eval(), "int8-dynamic")
    assert sum(isinstance(m, Int8DynamicLinear) for m in fused.modules()) == 2 * 4 + 1
    assert not any(isinstance(m, Int8DynamicLinear) for m in reference.modules())
    want, want_cached = every_position(reference, ids)
    got, got_cached = every_position(fused, ids)
    assert torch.equal(got, want) and torch.equal(got_cached, want_cached)
    loaded, _ = load_for_inference(save_quantized(fused, tok, tmp_path / "q"))
    assert sum(isinstance(m, Int8DynamicLinear) for m in loaded.modules()) == 2 * 4 + 1
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)


def test_a_layer_the_fused_kernel_cannot_take_keeps_torchaos_int8_path():
    """torch 2.13's kernel crashes on input widths that are not a multiple of 16: with n_embd 24 those layers keep
    torchao's int8 kernel (never float), the 96-wide MLP output takes the fused one, and the logits still match."""
    torch.manual_seed(0)
    config = NanoConfig(vocab_size=64, block_size=16, max_position_embeddings=32, n_layer=1, n_head=2, n_embd=24)
    model = NanoLM(config).eval()
    reference = NanoLM(config).eval()
    reference.load_state_dict(model.state_dict())
    fused = quantize_model(model, "int8")
    reference = quantize_model(reference, "int8", kernel="torchao")
    layer = fused.transformer.layers[0]
    assert isinstance(layer.mlp.proj, Int8Linear)
    for narrow in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc, fused.lm_head):
        assert type(narrow) is torch.nn.Linear and type(narrow.weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want, got = reference(ids), fused(ids)
    assert (got - want).abs().max().item() < 2**-7 * want.abs().max().item()


def test_without_the_fused_kernel_every_layer_stays_on_torchaos_int8(tmp_path, monkeypatch, model_dir, caplog):
    path, _, ids = model_dir(tmp_path)
    monkeypatch.setattr(q, "_fused_kernel_error", "no _weight_int8pack_mm in this torch")
    with caplog.at_level("WARNING", logger=q.__name__):
        model, _ = load_for_inference(path, "int8")
    assert "no _weight_int8pack_mm in this torch" in caplog.text
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert {type(m.weight).__name__ for m in linears} == {"Int8Tensor"}


@pytest.mark.parametrize("mode", MODES)
def test_a_saved_int8_directory_loads_to_the_same_numbers_without_float_weights(tmp_path, mode, model_dir):
    path, tok, ids = model_dir(tmp_path)
    quantized, _ = load_for_inference(path, mode)
    out = save_quantized(quantized, tok, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # the vocabulary matrix is stored once per use, as int8 rows: no float copy of it is left
    assert dtypes["transformer.embeddings.token.weight.qdata"] == "I8"
    assert dtypes["lm_head.weight.qdata"] == "I8"
    assert "transformer.embeddings.token.weight" not in dtypes and "lm_head.weight" not in dtypes
    assert json.loads((out / "quantization.json").read_text())["mode"] == mode
    loaded, loaded_tok = load_for_inference(out)
    assert loaded.quantization == mode and loaded_tok.fingerprint() == tok.fingerprint()
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))  # the stored int8 data, not a second rounding
    # and it decodes (the KV-cache path) exactly as the in-memory quantized model does
    prompt = ids[:, :5]
    assert torch.equal(generate(loaded, prompt, 10, temperature=0), generate(quantized, prompt, 10, temperature=0))


def test_quantize_command_writes_a_directory_generate_uses_and_training_refuses(tmp_path, capsys, model_dir):
    path, tok, ids = model_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("world:\n  seed: 3\n")  # the run's config, beside its model directory
    out = tmp_path / "int8"
    assert main(["quantize", str(path.parent / path.name), str(out)]) == 0
    assert "int8" in capsys.readouterr().out
    assert (out / "config.yaml").read_text() == "world:\n  seed: 3\n"  # evaluation finds the run's world
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(["quantize", str(path), str(out)])
    argv = ["generate", "--model", str(out), "--prompt", "the ", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(argv) == 0
    expected = generate(load_for_inference(out)[0], torch.tensor([tok.encode("the ")]), 8, temperature=0)
    assert capsys.readouterr().out == "the " + tok.decode(expected[0, 4:], skip_special_tokens=True) + "\n"
    with pytest.raises(SystemExit, match=r"error: --quantize int8-dynamic: .* already quantized to int8"):
        main([*argv, "--quantize", "int8-dynamic"])
    with pytest.raises(SystemExit, match="error: --dtype and --quantize: give one"):
        main(["generate", "--model", str(path), *argv[3:], "--quantize", "int8", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="int8-quantized model, which is for inference"):
        load_pretrained(out)  # what stage.init_from and resume go through


def test_no_silent_float_fallback(tmp_path, monkeypatch, model_dir):
    path, _, _ = model_dir(tmp_path)
    import torchao.quantization as tq

    real = tq.quantize_

    def skips_linears(model, config, filter_fn=None):  # a torchao that leaves the linear layers alone
        if isinstance(config, tq.IntxWeightOnlyConfig):
            real(model, config, filter_fn=filter_fn)

    monkeypatch.setattr(tq, "quantize_", skips_linears)
    with pytest.raises(QuantizationError, match=r"weights left in float after quantizing to int8: \['transformer"):
        load_for_inference(path, "int8")


def test_a_missing_torchao_names_the_extra_before_the_weights_are_read(tmp_path, monkeypatch, model_dir):
    import sys

    path, _, _ = model_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import raises ImportError
    monkeypatch.setattr("neuraflux.model.io.load_pretrained", lambda *a: pytest.fail("weights read first"))
    with pytest.raises(SystemExit, match=r"error: --quantize int8: quantization needs torchao: pip install"):
        main(["generate", "--model", str(path), "--prompt", "x", "--quantize", "int8"])


def test_a_damaged_quantized_directory_is_named(tmp_path, model_dir):
    path, tok, _ = model_dir(tmp_path)
    out = save_quantized(load_for_inference(path, "int8")[0], tok, tmp_path / "q")
    record = json.loads((out / "quantization.json").read_text())
    record["tensors"].pop("lm_head.weight")  # the head's int8 parts are now unexpected plain tensors
    (out / "quantization.json").write_text(json.dumps(record))
    with pytest.raises(QuantizationError, match=r"model.safetensors: weights do not match the model"):
        load_for_inference(out)
    (out / "quantization.json").write_text('{"mode": "int4", "format_version": 1, "tensors": {}}')
    with pytest.raises(QuantizationError, match=r"quantization.json is unreadable: unknown quantization mode 'int4'"):
        load_for_inference(out)


def test_quantizing_twice_is_refused(tmp_path, model_dir):
    path, _, _ = model_dir(tmp_path)
    model, _ = load_for_inference(path, "int8")
    with pytest.raises(QuantizationError, match=r"already quantized \(int8\)"):
        quantize_model(model, "int8-dynamic")


def test_the_server_config_names_a_bad_quantize_value():
    from neuraflux.serve.config import ServeConfig

    with pytest.raises(ValueError, match="serve.quantize must be null or one of int8, int8-dynamic, got 'int4'"):
        ServeConfig(quantize="int4")


def test_eval_and_serve_take_quantize(tmp_path, model_dir, monkeypatch):
    """`python -m neuraflux.eval --quantize` evaluates the int8 copy; `neuraflux serve --quantize` serves it."""
    import neuraflux.eval as ev
    from neuraflux import serve

    class Loaded(Exception):
        """Raised where the command would start its work: it has loaded the model it was given."""

    def stop(model, *args, **kwargs):
        raise Loaded(model.quantization)

    path, tok, _ = model_dir(tmp_path)
    monkeypatch.setattr(ev, "evaluate", stop)
    with pytest.raises(Loaded, match="^int8$"):
        ev.main(["--model", str(path), "--quantize", "int8"])
    monkeypatch.setattr(serve, "create_app", lambda config, model, *a, **k: stop(model))
    with pytest.raises(Loaded, match="^int8-dynamic$"):
        serve.main(["--model", str(path), "--quantize", "int8-dynamic"])
    out = save_quantized(load_for_inference(path, "int8")[0], tok, tmp_path / "q")
    with pytest.raises(SystemExit, match="error: --quantize int8-dynamic: .* already quantized to int8"):
        ev.main(["--model", str(out), "--quantize", "int8-dynamic"])


def test_the_feedback_store_identifies_an_int8_model_by_its_weights(tmp_path, model_dir):
    """weights_sha256 (the model identity on every stored answer) hashes torchao's int8 tensors by their parts:
    the same for two loads of one quantized directory, different from the float model's."""
    from neuraflux.feedback.store import weights_sha256

    path, tok, _ = model_dir(tmp_path)
    out = save_quantized(load_for_inference(path, "int8")[0], tok, tmp_path / "q")
    first, second = weights_sha256(load_for_inference(out)[0]), weights_sha256(load_for_inference(out)[0])
    assert first == second
    assert first != weights_sha256(load_for_inference(path)[0])
