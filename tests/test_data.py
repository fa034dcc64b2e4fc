import pytest
import torch

from neuraflux.chat import END, EOS
from neuraflux.data import LMDataModule, SFTDataModule, StreamSampler
from neuraflux.data.sft import make_sft_collate
from neuraflux.tokenizer import NanoTokenizer


def test_missing_and_empty_files_fail_at_once_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.txt")):
        LMDataModule(path=str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"file {empty} is empty"):
        LMDataModule(path=str(empty))
    with pytest.raises(ValueError, match="exactly one of data.path, data.dataset or data.builtin"):
        LMDataModule(path=str(empty), builtin="world")


def test_stream_sampler_is_seeded_resumable_and_sharded():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    full = take(StreamSampler(10, seed=3), 25)  # crosses two epoch boundaries
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]  # each epoch its own permutation
    assert take(StreamSampler(10, seed=3, start=13), 12) == full[13:25]
    r0, r1 = take(StreamSampler(10, 3, rank=0, world_size=2), 5), take(StreamSampler(10, 3, rank=1, world_size=2), 5)
    assert sorted(r0 + r1) == list(range(10))


def test_lm_windows_from_text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abcdefghij" * 30)
    dm = LMDataModule(path=str(f), block_size=16, batch_size=4, val_fraction=0.2, stride=1)
    dm.tokenizer = NanoTokenizer.train(dm.texts(), 0, mode="char")
    dm.setup()
    n = 300 + 1  # characters plus the eos that ends the document
    assert len(dm.train_tokens) + len(dm.val_tokens) == n
    assert len(dm.val_tokens) == int(n * 0.2)
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape == (4, 16)
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])  # targets are inputs shifted by one
    assert bool(batch.loss_mask.all())


def test_sft_loss_mask_covers_exactly_the_response(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "what is up", "response": "sky", "context": "c"}\n')
    dm = SFTDataModule(path=str(f), block_size=64, batch_size=2, val_fraction=0.5)
    tok = NanoTokenizer.train(dm.texts(), 0, mode="char")
    dm.tokenizer = tok
    dm.setup()
    items = dm.train_set.records + dm.val_set.records
    batch = make_sft_collate(tok.pad_id)(items)
    for i in range(len(items)):
        trained = batch.targets[i][batch.loss_mask[i]].tolist()
        text = tok.decode(trained)
        assert text in (f"yo{END}{EOS}", f"sky{END}{EOS}")
    assert batch.attention_mask is not None and int(batch.attention_mask[0].sum()) == len(items[0]["ids"]) - 1


def test_sft_file_needs_fields(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "hi", "response": "yo"}\n')
    with pytest.raises(ValueError, match=r"SFT records need fields \['prompt'\]"):
        SFTDataModule(path=str(f))


def test_sft_repeats_oversample_the_training_split_only(tmp_path):
    f = tmp_path / "pairs.jsonl"
    lines = [f'{{"prompt": "q{i}", "response": "a{i}", "repeats": {1 + i % 3}}}' for i in range(20)]
    f.write_text("\n".join(lines) + "\n")
    dm = SFTDataModule(path=str(f), block_size=64, batch_size=2, val_fraction=0.25)
    tok = NanoTokenizer.train(dm.texts(), 0, mode="char")
    dm.tokenizer = tok
    dm.setup()

    def prompt_of(record):
        return tok.decode(record["ids"]).split("q", 1)[1].split(END)[0]  # "7" of "...q7..."

    val = {prompt_of(r) for r in dm.val_set.records}
    assert len(val) == len(dm.val_set.records) == 5  # one copy each
    train = [prompt_of(r) for r in dm.train_set.records]
    assert not val & set(train)
    # every training record appears 1 + i % 3 times
    assert sorted(train) == sorted(str(i) for i in range(20) if str(i) not in val for _ in range(1 + i % 3))


@pytest.mark.parametrize("value", ["0", "1.5", "true", '"x"', "null"])
def test_sft_bad_repeats_name_the_record(tmp_path, value):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        f'{{"prompt": "hi", "response": "yo", "repeats": 1}}\n{{"prompt": "a", "response": "b", "repeats": {value}}}\n'
    )
    with pytest.raises(ValueError, match=rf"^{f}, line 2: field 'repeats' is .*; it must be an integer >= 1$"):
        SFTDataModule(path=str(f))
