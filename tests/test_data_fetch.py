"""`neuraflux data`: the catalog, a download from a local HTTP server written whole or not at all, and the offline
and overwrite cases, each one line."""

import gzip
import http.server
import socket
import threading

import pytest

from neuraflux.cli import main
from neuraflux.data import catalog
from neuraflux.data.preference import PreferenceDataset

PAIRS = b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: go away"}\n'


@pytest.fixture
def server():
    """A local HTTP server: /pairs.jsonl.gz, /short (promises more bytes than it sends), anything else 404."""
    body = gzip.compress(PAIRS * 3)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/pairs.jsonl.gz":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/short":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"only this")
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_catalog_name_downloads_whole_and_trains_as_its_entry_says(tmp_path, server, monkeypatch, capsys):
    entry = catalog.CATALOG["hh-rlhf-harmless-test"]
    monkeypatch.setitem(
        catalog.CATALOG,
        "hh-rlhf-harmless-test",
        catalog.PublicDataset(**{**entry.__dict__, "url": f"{server}/pairs.jsonl.gz"}),
    )
    assert main(["data", "fetch", "hh-rlhf-harmless-test", "--out", str(tmp_path)]) == 0
    path = tmp_path / "hh-rlhf-harmless-base-test.jsonl.gz"
    assert capsys.readouterr().out.startswith(f"wrote {path}")
    assert gzip.decompress(path.read_bytes()) == PAIRS * 3
    assert f"data.path=data/{path.name}" in entry.use  # the entry's command reads the file where fetch put it
    assert len(PreferenceDataset.from_jsonl(path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_existing_files_are_kept_unless_forced(tmp_path, server):
    (tmp_path / "pairs.jsonl.gz").write_bytes(b"mine")
    with pytest.raises(SystemExit, match=r"pairs.jsonl.gz already exists: --force replaces it"):
        main(["data", "fetch", f"{server}/pairs.jsonl.gz", "--out", str(tmp_path)])
    assert (tmp_path / "pairs.jsonl.gz").read_bytes() == b"mine"
    assert main(["data", "fetch", f"{server}/pairs.jsonl.gz", "--out", str(tmp_path), "--force"]) == 0
    assert gzip.decompress((tmp_path / "pairs.jsonl.gz").read_bytes()) == PAIRS * 3


def test_failed_downloads_leave_nothing_and_say_what_to_do(tmp_path, server):
    with pytest.raises(SystemExit, match=r"the connection ended after 9 of 1,000 bytes"):
        main(["data", "fetch", f"{server}/short", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"could not download .*/missing.txt: the server answered HTTP 404 Not Found$"):
        main(["data", "fetch", f"{server}/missing.txt", "--out", str(tmp_path)])
    with socket.socket() as s:  # a port nobody listens on: what offline looks like to urllib
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(SystemExit, match=r"Offline\? Fetch that address .* and put the file at .*x.txt"):
        main(["data", "fetch", f"http://127.0.0.1:{closed}/x.txt", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_and_the_listing():
    with pytest.raises(SystemExit, match=r"unknown dataset 'shakespeare': give one of tinyshakespeare"):
        main(["data", "fetch", "shakespeare"])
    with pytest.raises(SystemExit, match="data fetch needs a NAME"):
        main(["data", "fetch"])
    text = catalog.listing()
    assert all(name in text and d.url in text and d.use in text for name, d in catalog.CATALOG.items())
