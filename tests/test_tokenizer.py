import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuraflux.chat import SPECIAL_TOKENS, render_prompt
from neuraflux.tokenizer import NanoTokenizer, StreamDecoder

CORPUS = ["The river Ombra runs through Kelvash, home of the weavers. " * 20, "Grelmo founded Tavrin in 1204. " * 20]


@pytest.fixture(scope="module")
def bpe():
    return NanoTokenizer.train(CORPUS, vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(text):
    tok = _BPE
    assert tok.decode(tok.encode(text)) == text


_BPE = NanoTokenizer.train(CORPUS, vocab_size=400)


def test_special_tokens_are_single_ids_and_come_first(bpe):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert bpe.encode(t) == [i]
    assert bpe.pad_id == 0
    prompt = render_prompt([{"role": "user", "content": "hi"}])
    ids = bpe.encode(prompt)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.token_to_id("<|assistant|>")


def test_bpe_learns_merges_to_vocab_size(bpe):
    assert bpe.vocab_size <= 400
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0]) / 2  # merges compress the training text


def test_split_digits_makes_every_digit_a_token(bpe):
    assert len(bpe.encode(" 1204")) < 5  # by default BPE merges the frequent number
    split = NanoTokenizer.train(CORPUS, vocab_size=400, split_digits=True)
    pieces = [split.decode([i]) for i in split.encode("founded Tavrin in 1204.")]
    assert pieces[-6:] == [" ", "1", "2", "0", "4", "."]  # "1204" is in the corpus 20 times, yet never merged
    assert split.decode(split.encode("in 1204 and 99")) == "in 1204 and 99"


def test_small_vocab_is_refused():
    with pytest.raises(ValueError, match="tokenizer.vocab_size must be >= 263"):
        NanoTokenizer.train(CORPUS, vocab_size=100)


def test_save_load(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path.name == "tokenizer.json"
    loaded = NanoTokenizer.load(tmp_path)
    assert loaded.encode(CORPUS[1]) == bpe.encode(CORPUS[1]) and loaded.fingerprint() == bpe.fingerprint()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        NanoTokenizer.load(tmp_path / "missing.json")


def test_char_mode(tmp_path):
    tok = NanoTokenizer.train(["hello world"], vocab_size=0, mode="char")
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + len(set("hello world"))
    ids = tok.encode("<|bos|>hold")
    assert ids[0] == tok.bos_id and len(ids) == 5
    assert tok.decode(ids) == "<|bos|>hold"
    assert tok.decode(tok.encode("hex")) == "he\ufffd"  # x was never seen
    assert NanoTokenizer.load(tok.save(tmp_path)).encode("world") == tok.encode("world")


def test_pad_batch_sides(bpe):
    ids, mask = bpe.pad_batch([[5, 6, 7], [8]], padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, mask = bpe.pad_batch([[5, 6, 7], [8]], padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert bpe.pad_batch([[1, 2, 3, 4]], max_length=2)[0].tolist() == [[3, 4]]


def test_stream_decoder_never_splits_a_character(bpe):
    text = "naïve 😀 café"
    dec = StreamDecoder(bpe)
    pieces = [dec.push(i) for i in bpe.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
