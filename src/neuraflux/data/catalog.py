"""The public datasets NeuraFlux knows, and `neuraflux data fetch` that downloads one into `data/`.

    neuraflux data list
    neuraflux data fetch tinyshakespeare                 # -> data/tinyshakespeare.txt
    neuraflux data fetch https://example.org/corpus.txt  # any http(s) file
    neuraflux data fetch Anthropic/hh-rlhf --split test  # a Hugging Face hub dataset, written as JSON lines

A download goes to a temporary file beside its target and is renamed into place when complete, so an interrupted
one leaves nothing behind, and an existing file is replaced only with --force. Offline, the error says which
address to fetch by hand and where to put the file. Nothing fetched is executed: text, JSON lines, gzip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DATA_DIR = Path("data")


class FetchError(RuntimeError):
    """A dataset that could not be fetched: the message says why and what to do instead."""


@dataclass(frozen=True)
class PublicDataset:
    url: str
    filename: str
    license: str
    about: str
    use: str  # the command that trains on it, with the file where `fetch` puts it


CATALOG: dict[str, PublicDataset] = {
    "tinyshakespeare": PublicDataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        filename="tinyshakespeare.txt",
        license="public domain (Shakespeare's plays; the file from karpathy/char-rnn)",
        about="1.1 MB of Shakespeare, nanoGPT's character-level benchmark",
        use="python train.py experiment=char_cpu data.path=data/tinyshakespeare.txt curriculum=none",
    ),
    "hh-rlhf-harmless-test": PublicDataset(
        url="https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/test.jsonl.gz",
        filename="hh-rlhf-harmless-base-test.jsonl.gz",
        license="MIT (Anthropic/hh-rlhf)",
        about="2,312 human preference pairs on harmlessness (chosen/rejected transcripts)",
        use=(
            "python train.py curriculum=none stage=reward stage.init_from=SFT_MODEL data=preference "
            "data.path=data/hh-rlhf-harmless-base-test.jsonl.gz"
        ),
    ),
    "hh-rlhf-harmless-train": PublicDataset(
        url="https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/train.jsonl.gz",
        filename="hh-rlhf-harmless-base-train.jsonl.gz",
        license="MIT (Anthropic/hh-rlhf)",
        about="42,537 human preference pairs on harmlessness",
        use=(
            "python train.py curriculum=none stage=reward stage.init_from=SFT_MODEL data=preference "
            "data.path=data/hh-rlhf-harmless-base-train.jsonl.gz"
        ),
    ),
}

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def fetch(source: str, out_dir: Path = DATA_DIR, force: bool = False, split: str = "train", timeout: float = 30.0):
    """Download a catalog name, an http(s) URL or a hub dataset into `out_dir`; the path written. FetchError for
    an unknown name, a file that exists (without `force`), or a download that fails."""
    if source in CATALOG:
        entry = CATALOG[source]
        return download(entry.url, out_dir / entry.filename, force, timeout)
    if urlparse(source).scheme in ("http", "https"):
        name = Path(urlparse(source).path).name
        if not name:
            raise FetchError(f"{source}: the address names no file")
        return download(source, out_dir / name, force, timeout)
    if HUB_NAME.match(source):
        return fetch_hub(source, split, out_dir, force)
    raise FetchError(
        f"unknown dataset {source!r}: give one of {', '.join(CATALOG)} (neuraflux data list), an http(s) address "
        "or a Hugging Face hub name (owner/name)"
    )


def download(url: str, target: Path, force: bool = False, timeout: float = 30.0) -> Path:
    """`url` to `target` through a temporary file renamed into place when the whole body has arrived."""
    if target.exists() and not force:
        raise FetchError(f"{target} already exists: --force replaces it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1 << 20)
            written = out.tell()
        if expected is not None and written != int(expected):
            raise FetchError(f"{url}: the connection ended after {written:,} of {int(expected):,} bytes; try again")
        os.replace(tmp, target)
    except urllib.error.HTTPError as err:  # reached the server, which has no such file
        raise FetchError(f"could not download {url}: the server answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise FetchError(
            f"could not download {url} ({reason}). Offline? Fetch that address on a machine with network access "
            f"and put the file at {target}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fetch_hub(name: str, split: str, out_dir: Path, force: bool) -> Path:
    """A Hugging Face hub dataset's split as JSON lines (`datasets.load_dataset`; its cache and HF_HUB_OFFLINE
    apply)."""
    target = out_dir / f"{name.replace('/', '__')}-{split}.jsonl"
    if target.exists() and not force:
        raise FetchError(f"{target} already exists: --force replaces it")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises its own types for offline, missing and gated datasets
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FetchError(
            f"could not load {name} (split {split}) from the Hugging Face hub: {first}. Offline? Run this command "
            "on a machine with network access and copy the file it writes"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        ds.to_json(tmp, lines=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def listing() -> str:
    """The catalog, one block per dataset."""
    return "\n\n".join(
        f"{name}: {d.about}\n  license: {d.license}\n  source: {d.url}\n  use: {d.use}" for name, d in CATALOG.items()
    )
