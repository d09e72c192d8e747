import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpt_trainer.config import CHINESE_PROMPTS, parse_args
from gpt_trainer.data import corpora
from gpt_trainer.data.corpora import (
    BUILTIN_POEMS,
    RemoteCorpus,
    chinese_default,
    fetch_remote_corpus,
    load_corpus,
    load_named,
    read_data_path,
)
from gpt_trainer.errors import UsageError

POEMS = [{"rhythmic": "虞美人", "paragraphs": ["春花秋月何时了？", "往事知多少。"]},
         {"title": "静夜思", "paragraphs": ["床前明月光，", "疑是地上霜。"]}]


# ---- the user's files -----------------------------------------------------------------------------------------------
def test_gb18030_text_is_decoded_with_a_notice(tmp_path, capsys):
    path = tmp_path / "gbk.txt"
    path.write_bytes("春江潮水连海平\r\n海上明月共潮生\r\n".encode("gbk"))
    corpus = read_data_path(str(path))
    assert corpus.text == "春江潮水连海平\n海上明月共潮生\n"
    assert "GB18030" in capsys.readouterr().err
    assert corpora.default_prompts_for(corpus.text) == CHINESE_PROMPTS


def test_bom_is_stripped(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\r\nworld".encode("utf-8"))
    assert read_data_path(str(tmp_path / "bom.txt")).text == "hello\nworld"


def test_undecodable_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\x81\x30\xff\x7f\x80" * 10)
    with pytest.raises(UsageError, match="neither UTF-8, UTF-16/32 nor GB18030.*iconv"):
        read_data_path(str(tmp_path / "bad.txt")).text  # files are read as they are streamed


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_are_decoded_with_or_without_a_bom(tmp_path, capsys, codec):
    text = "静夜思\n床前明月光，疑是地上霜。\nMoonlight\n"
    (tmp_path / "wide.txt").write_bytes(text.encode(codec))  # "utf-16"/"utf-32" write a BOM, the others none
    assert read_data_path(str(tmp_path / "wide.txt")).text == text
    named = {"utf-16": "UTF-16-LE", "utf-32": "UTF-32-LE"}.get(codec, codec.upper())  # with a BOM: x86 byte order
    assert f"is {named} text" in capsys.readouterr().err


def test_text_with_nul_characters_is_refused(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"poems\x00\x01\x02 and then some more bytes")
    with pytest.raises(UsageError, match="contains NUL characters"):
        read_data_path(str(tmp_path / "binary.txt")).text


def test_folder_of_chinese_poetry_json_and_jsonl(tmp_path):
    (tmp_path / "ci.song.0.json").write_text(json.dumps(POEMS, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "extra.jsonl").write_text('{"text": "鹅鹅鹅，曲项向天歌。"}\n\n', encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("not read")
    text = read_data_path(str(tmp_path)).text
    assert "虞美人\n春花秋月何时了？往事知多少。\n" in text
    assert "静夜思\n床前明月光，疑是地上霜。\n" in text
    assert "鹅鹅鹅，曲项向天歌。" in text and "not read" not in text


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "none of its 2 JSON records"),
    ("{broken", "not valid JSON"),
])
def test_bad_json_names_the_file(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(UsageError, match=message):
        read_data_path(str(tmp_path / "x.json")).text


# ---- downloads, against a real HTTP server on 127.0.0.1 -------------------------------------------------------------
class RangeHandler(BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []
    cut_after: int | None = None  # bytes sent before the connection drops (the length promised is the whole file)

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:][:self.cut_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.requests, RangeHandler.cut_after = {}, [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def poetry_files():
    return {f"/ci/ci.song.{i}.json": json.dumps(POEMS[i:i + 1], ensure_ascii=False).encode() for i in range(2)}


def spec_for(files, **kwargs):
    return RemoteCorpus("song_ci", "http://unused.invalid", "TEST_MIRROR_URL", tuple(f.lstrip("/") for f in files),
                        **kwargs)


def test_download_once_through_a_mirror_variable(server, tmp_path, monkeypatch):
    httpd, url = server
    RangeHandler.files = poetry_files()
    monkeypatch.setenv("TEST_MIRROR_URL", url)
    monkeypatch.setitem(corpora.REMOTE_CORPORA, "song_ci", spec_for(RangeHandler.files))
    first = corpora.remote_corpus("song_ci", str(tmp_path))
    assert "虞美人\n春花秋月何时了？往事知多少。" in first.text and "静夜思" in first.text
    assert len(RangeHandler.requests) == 2
    second = corpora.remote_corpus("song_ci", str(tmp_path))
    assert second.text == first.text and len(RangeHandler.requests) == 2  # cached: no new request
    sums = json.loads((tmp_path / "corpora" / "song_ci" / "SHA256SUMS.json").read_text())
    assert sums["ci/ci.song.0.json"] == hashlib.sha256(RangeHandler.files["/ci/ci.song.0.json"]).hexdigest()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path, monkeypatch):
    httpd, url = server
    body = ("床前明月光，疑是地上霜。" * 500).encode()
    RangeHandler.files = {"/input.txt": body}
    folder = tmp_path / "corpora" / "song_ci"
    folder.mkdir(parents=True)
    (folder / "input.txt.part").write_bytes(body[:1000])  # what a dropped connection left behind
    monkeypatch.setenv("TEST_MIRROR_URL", url)
    spec = spec_for(RangeHandler.files, sha256={"input.txt": hashlib.sha256(body).hexdigest()})
    fetch_remote_corpus(spec, str(tmp_path))
    assert RangeHandler.requests == [("/input.txt", "bytes=1000-")]
    assert (folder / "input.txt").read_bytes() == body
    assert not (folder / "input.txt.part").exists()


def test_a_connection_cut_mid_file_is_never_taken_for_the_whole_file(server, tmp_path, monkeypatch):
    httpd, url = server
    RangeHandler.files = poetry_files()  # digests not known in advance, as for the real corpora
    whole = len(RangeHandler.files["/ci/ci.song.0.json"])
    RangeHandler.cut_after = 10
    monkeypatch.setenv("TEST_MIRROR_URL", url)
    monkeypatch.setitem(corpora.REMOTE_CORPORA, "song_ci", spec_for(RangeHandler.files))
    with pytest.raises(corpora.CorpusUnavailable, match=f"closed after 10 of {whole} bytes"):
        corpora.remote_corpus("song_ci", str(tmp_path))
    folder = tmp_path / "corpora" / "song_ci"
    assert not (folder / "ci__ci.song.0.json").exists() and not (folder / "SHA256SUMS.json").exists()
    assert (folder / "ci__ci.song.0.json.part").stat().st_size == 10  # kept, to be continued
    RangeHandler.cut_after = None  # the network is back
    assert "虞美人\n春花秋月何时了？往事知多少。" in corpora.remote_corpus("song_ci", str(tmp_path)).text
    assert RangeHandler.requests[1] == ("/ci/ci.song.0.json", "bytes=10-")


def test_checksum_mismatch_is_rejected_and_the_file_removed(server, tmp_path, monkeypatch):
    httpd, url = server
    RangeHandler.files = {"/input.txt": b"tampered"}
    monkeypatch.setenv("TEST_MIRROR_URL", url)
    with pytest.raises(UsageError, match="expected 0000"):
        fetch_remote_corpus(spec_for(RangeHandler.files, sha256={"input.txt": "0" * 64}), str(tmp_path))
    assert list((tmp_path / "corpora" / "song_ci").glob("input.txt*")) == []


# ---- the Chinese default and its offline fallbacks ------------------------------------------------------------------
def fake_fortunes(folder):
    folder.mkdir()
    (folder / "tang300").write_text("\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n"
                                    "\x1b[32m《春晓》\x1b[m\n春眠不觉晓，处处闻啼鸟。\n%\n", encoding="utf-8")
    (folder / "song100").write_text("\x1b[32m《虞美人》\x1b[m\n春花秋月何时了？\n%\n", encoding="utf-8")


def test_fortunes_zh_is_read_without_its_colours_and_separators(tmp_path, monkeypatch):
    fake_fortunes(tmp_path / "fortunes")
    monkeypatch.setattr(corpora, "FORTUNES_DIR", str(tmp_path / "fortunes"))
    corpus = load_named("fortunes_zh", str(tmp_path / "cache"))
    assert "《静夜思》\n作者：李白\n床前明月光" in corpus.text and "\x1b" not in corpus.text and "%" not in corpus.text


def test_no_network_falls_back_to_the_embedded_poems_even_with_fortunes_zh_installed(server, tmp_path, monkeypatch,
                                                                                     capsys):
    httpd, url = server  # serves nothing: every download is a 404
    monkeypatch.setenv("CHINESE_POETRY_BASE_URL", url)
    fake_fortunes(tmp_path / "fortunes")  # Tang 300 + Song 100 is five times smaller than the embedded poems
    monkeypatch.setattr(corpora, "FORTUNES_DIR", str(tmp_path / "fortunes"))
    corpus = chinese_default(str(tmp_path / "cache"))
    assert corpus.name == "builtin" and "床前明月光" not in corpus.text
    err = capsys.readouterr().err
    assert "could not download the song_ci corpus" in err and "embedded Tang poems" in err


def test_the_embedded_poems_are_read_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("CHINESE_POETRY_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    corpus = load_corpus(parse_args([f"--cache_dir={tmp_path}"]))
    assert corpus.name == "builtin" and corpus.text == BUILTIN_POEMS.read_text(encoding="utf-8")
    assert corpus.text.count("\n\n") > 2000 and "春江" in corpus.text and "往事" in corpus.text  # the default prompts


def test_a_run_folder_inside_the_data_path_folder_is_not_read_as_corpus(tiny_argv, tmp_path, capsys):
    from gpt_trainer.commands.train import main
    from tests.conftest import CLASSIC_POEMS

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_text(CLASSIC_POEMS.read_text(encoding="utf-8"), encoding="utf-8")
    argv = tiny_argv(f"--data_path={data}", f"--output_dir={data / 'run'}", "--eval_interval=2")
    assert main([*argv, "--max_steps=2"]) == 0
    assert {"samples.txt", "metrics.jsonl", "config.json"} <= {p.name for p in (data / "run").iterdir()}
    capsys.readouterr()
    assert main([*argv, "--resume", "--max_steps=3"]) == 0  # the same text: its own files were not added to it
    assert f"note: {data / 'run'} is a training run's folder inside --data_path" in capsys.readouterr().err


# ---- streaming in pieces: the text does not depend on where the pieces are cut ---------------------------------------
STREAM_TEXT = ("静夜思\r\n床前明月光，疑是地上霜。😀𠀀\r\n\r\nplain ascii line\r\n"
               + "长" * 300 + "😀𠀀x" * 50 + "\r\n末行 ends with a lone CR\r")


@pytest.mark.parametrize("bom", ["", "\ufeff"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_pieces_of_any_size_decode_to_the_text_of_a_whole_file_read(tmp_path, monkeypatch, chunk, bom):
    raw = (bom + STREAM_TEXT).encode("utf-8")
    path = tmp_path / "stream.txt"
    path.write_bytes(raw)
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    pieces = list(read_data_path(str(path)).pieces())
    assert "".join(text for text, _ in pieces) == corpora.decode_bytes(raw, str(path))
    assert sum(nbytes for _, nbytes in pieces) == len(raw)  # the progress bar counts every source byte once
    assert len(pieces) > 5  # it was streamed, not read whole


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_gb18030_in_tiny_pieces_decodes_as_a_whole_file_read(tmp_path, monkeypatch, chunk):
    raw = ("春江潮水连海平\r\n海上明月共潮生\r\n" * 5 + "滟" * 100 + "\r\n").encode("gb18030")
    (tmp_path / "gbk.txt").write_bytes(raw)
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    assert read_data_path(str(tmp_path / "gbk.txt")).text == corpora.decode_bytes(raw, "gbk.txt")


JSONL_RECORDS = [{"text": "床前明月光，\n疑是地上霜。"},
                 {"title": "静夜思", "paragraphs": ["举头望明月，", "低头思故乡。"]},
                 {"other": "no text field: skipped"}, {"text": "line one\nline two 😀𠀀\n\n"},
                 {"text": "长" * 200 + "\\n is not a break"},
                 {"rhythmic": "虞美人", "paragraphs": ["春花秋月何时了？"]}]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_jsonl_records_split_across_pieces_give_the_text_of_the_whole_records(tmp_path, monkeypatch, chunk):
    lines = [json.dumps(r, ensure_ascii=False) for r in JSONL_RECORDS]
    assert all("\n" not in line for line in lines) and "\\n" in lines[0]  # escaped newlines inside records
    (tmp_path / "records.jsonl").write_text("\r\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n",
                                            encoding="utf-8")
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    expected = corpora.json_records_to_text([json.loads(line) for line in lines], "records.jsonl")
    assert read_data_path(str(tmp_path / "records.jsonl")).text == expected


# ---- formats and bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [7, 8 << 20])
def test_gzip_files_read_as_their_uncompressed_twins(tmp_path, monkeypatch, chunk):
    import gzip

    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    plain = {"poems.txt": STREAM_TEXT.encode("utf-8"),
             "records.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in JSONL_RECORDS).encode("utf-8"),
             "ci.song.0.json": json.dumps(POEMS, ensure_ascii=False).encode("utf-8")}
    for name, raw in plain.items():
        (tmp_path / name).write_bytes(raw)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
        twin = read_data_path(str(tmp_path / name)).text
        assert twin.strip() and read_data_path(str(tmp_path / f"{name}.gz")).text == twin


def test_a_folder_reads_only_gzip_files_of_the_known_formats(tmp_path):
    import gzip

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("春江花月夜\n".encode("utf-8")))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress('{"text": "鹅鹅鹅"}\n'.encode("utf-8")))
    (tmp_path / "table.csv.gz").write_bytes(gzip.compress(b"not,read\n"))
    (tmp_path / "archive.tar.gz").write_bytes(gzip.compress(b"not read either\n"))
    corpus = read_data_path(str(tmp_path))
    assert [p.name for p in corpus.files] == ["a.txt.gz", "b.jsonl.gz"]
    assert corpus.text == "春江花月夜\n\n鹅鹅鹅\n"


@pytest.mark.parametrize("name", ["records.jsonl", "records.json"])
def test_text_field_names_the_field_that_holds_the_text(tmp_path, name):
    records = [{"content": "床前明月光，疑是地上霜。"}, {"content": "举头望明月，低头思故乡。"}]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) if name.endswith("l") else json.dumps(records)
    (tmp_path / name).write_text(body, encoding="utf-8")
    expected = "床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。\n"
    assert read_data_path(str(tmp_path / name), "content").text == expected
    with pytest.raises(UsageError, match=r"none of its 2 JSON records has a `paragraphs` list or a `text` string.*"
                                         r"--text_field"):
        read_data_path(str(tmp_path / name)).text


def test_empty_files_among_others_are_skipped_with_a_note_naming_them(tmp_path, capsys):
    import gzip

    (tmp_path / "a.txt").write_text("春江花月夜\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "hollow.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "z.txt").write_text("海上明月\n", encoding="utf-8")
    corpus = read_data_path(str(tmp_path))
    assert "skipped 2 empty file(s) in --data_path: empty.txt, hollow.jsonl.gz" in capsys.readouterr().err
    assert [p.name for p in corpus.files] == ["a.txt", "z.txt"] and corpus.text == "春江花月夜\n\n海上明月\n"


@pytest.mark.parametrize("chunk", [1, 2, 7, 8 << 20])
def test_a_file_cut_inside_its_last_character_loses_only_that_character(tmp_path, monkeypatch, capsys, chunk):
    raw = "春江花月夜\n海上明月".encode("utf-8")
    (tmp_path / "cut.txt").write_bytes(raw[:-1])  # the last of 月's three bytes is gone
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    assert read_data_path(str(tmp_path / "cut.txt")).text == "春江花月夜\n海上明"
    assert f"{tmp_path / 'cut.txt'} ends in the middle of a character" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 5, 8 << 20])
def test_a_malformed_json_line_names_the_file_and_the_line(tmp_path, monkeypatch, chunk):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "床前明月光"}\n\n{"text": "疑是地上霜"}\r\n{"text": "举头望明月",\n{"text": "x"}\n',
                    encoding="utf-8")
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    with pytest.raises(UsageError, match=rf"^{path}, line 4: not valid JSON"):
        read_data_path(str(path)).text


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8 << 20])
@pytest.mark.parametrize("bad", [b"\xff\xfe\xff", "春".encode("utf-8")[:1] + b"\xff\xff"])  # 2nd: after a lead byte
def test_undecodable_bytes_name_the_file_and_the_first_bad_byte(tmp_path, monkeypatch, chunk, bad):
    raw = "春江潮水连海平\r\n海上明月".encode("utf-8") + bad + "共潮生\n".encode("utf-8")
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    with pytest.raises(UnicodeDecodeError) as whole:
        raw.decode("utf-8")
    monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    with pytest.raises(UsageError, match="neither UTF-8, UTF-16/32 nor GB18030") as error:
        read_data_path(str(path)).text
    assert str(path) in str(error.value)
    assert f"first bad byte at offset {whole.value.start})" in str(error.value)


# ---- what a folder holds besides plain files: links, pipes ----------------------------------------------------------
def test_links_in_a_data_folder_are_followed_each_file_read_once_and_whatever_is_skipped_named(tmp_path, capsys):
    from pathlib import Path

    outside, data = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    data.mkdir()
    (outside / "b.txt").write_text("海上明月\n", encoding="utf-8")
    (data / "a.txt").write_text("春江花月夜\n", encoding="utf-8")
    (data / "linked").symlink_to(outside)  # a linked folder: read
    (data / "linked_again").symlink_to(outside)  # a second link to it: not read again
    (data / "up").symlink_to(data)  # a link back to the folder it is in: no endless recursion
    (data / "same.txt").symlink_to(data / "a.txt")  # the same file a second time: read once
    (data / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    (data / "loop.txt").symlink_to(data / "loop.txt")
    corpus = read_data_path(str(data))
    assert [p.relative_to(data) for p in corpus.files] == [Path("a.txt"), Path("linked/b.txt")]
    assert corpus.text == "春江花月夜\n\n海上明月\n"
    err = capsys.readouterr().err
    assert f"skipped 2 link(s) to a folder already read (a link back to a folder it is inside, or a second link to " \
           f"one folder), not read again in --data_path: {data / 'linked_again'}, {data / 'up'}" in err
    assert f"skipped 2 link(s) that lead nowhere (the target is missing, or the links loop) in --data_path: " \
           f"{data / 'dangling.txt'}, {data / 'loop.txt'}" in err
    assert f"skipped 1 file(s) reached a second time through links, read once in --data_path: " \
           f"{data / 'same.txt'}" in err


def test_a_named_pipe_is_refused_as_data_path_and_skipped_with_a_note_in_a_folder(tmp_path, capsys):
    import os

    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "pipe.txt")  # nothing ever writes to it: reading it would wait for ever
    with pytest.raises(UsageError, match=r"pipe\.txt is a named pipe \(FIFO\), not a regular file: preparation reads "
                                         r"the text twice .* Save the text to a file"):
        read_data_path(str(data / "pipe.txt"))
    (data / "a.txt").write_text("春江花月夜\n", encoding="utf-8")
    corpus = read_data_path(str(data))
    assert [p.name for p in corpus.files] == ["a.txt"] and corpus.text == "春江花月夜\n"
    assert f"skipped 1 file(s) that are not regular files (a named pipe, a device or a socket: they cannot be read " \
           f"twice, as preparation does) in --data_path: {data / 'pipe.txt'}" in capsys.readouterr().err


# ---- notes and advice that fit ---------------------------------------------------------------------------------------
def test_each_note_about_a_file_is_said_once_however_often_the_corpus_is_read(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cut.txt").write_bytes("春江花月夜\n海上明月".encode("utf-8")[:-1])
    (data / "gbk.txt").write_bytes("春眠不觉晓\r\n".encode("gbk"))
    (data / "wide.txt").write_bytes("静夜思\n床前明月光\n".encode("utf-16"))
    (data / "records.jsonl").write_text('{"text": "鹅鹅鹅"}\n{"other": 1}\n', encoding="utf-8")
    corpus = read_data_path(str(data))
    capsys.readouterr()
    assert "".join(t for t, _ in corpus.pieces()) == "".join(t for t, _ in corpus.pieces())  # read twice, as prepared
    err = capsys.readouterr().err
    for note in (f"{data / 'cut.txt'} ends in the middle of a character", f"{data / 'wide.txt'} is UTF-16-LE text",
                 f"{data / 'gbk.txt'} is not UTF-8", f"{data / 'records.jsonl'}: 1 of its 2 JSON records"):
        assert err.count(note) == 1, (note, err)


def test_a_damaged_gzip_file_is_called_damaged_with_no_word_of_permissions(tmp_path):
    import gzip

    whole = gzip.compress(("春江花月夜\n" * 2000).encode("utf-8"))
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.txt.gz").write_bytes(b"plain text, not gzip")
    for name in ("cut.txt.gz", "plain.txt.gz"):
        with pytest.raises(UsageError) as error:
            read_data_path(str(tmp_path / name)).text
        message = str(error.value)
        assert f"{tmp_path / name} cannot be decompressed (" in message and "cut short or damaged" in message
        assert "gzip -t" in message and "permission" not in message


@pytest.mark.parametrize("name", ["b.txt", "b.json"])
def test_a_file_that_vanishes_before_it_is_read_is_said_to_have_been_moved_or_deleted(tmp_path, name):
    (tmp_path / "a.txt").write_text("春江花月夜\n", encoding="utf-8")
    (tmp_path / name).write_text('[{"text": "海上明月"}]' if name.endswith("json") else "海上明月\n", encoding="utf-8")
    corpus = read_data_path(str(tmp_path))
    (tmp_path / name).unlink()  # after the folder was listed, before its text is read
    with pytest.raises(UsageError) as error:
        corpus.text
    message = str(error.value)
    assert message.startswith(f"{tmp_path / name} vanished while it was being read: it was moved or deleted")
    assert "permission" not in message


@pytest.mark.parametrize("name", ["records.jsonl", "records.json"])
def test_records_without_the_text_field_are_counted_in_a_note(tmp_path, capsys, name):
    records = [{"text": "床前明月光"}, {"content": "疑是地上霜"}, {"content": "举头望明月"}, 5]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) if name.endswith("l") else json.dumps(records)
    (tmp_path / name).write_text(body, encoding="utf-8")
    assert read_data_path(str(tmp_path / name)).text == "床前明月光\n"
    assert f"note: {tmp_path / name}: 3 of its 4 JSON records have no `paragraphs` list or `text` string and are " \
           f"left out (--text_field names the field that holds the text)." in capsys.readouterr().err


# the opening of Lu Xun's 狂人日记 (1918), indented with ideographic spaces (U+3000) as Chinese prose is
KUANGREN_RIJI = ("　　今天晚上，很好的月光。\n"
                 "　　我不见他，已是三十多年；今天见了，精神分外爽快。才知道以前的三十多年，全是发昏；然而须十分小心。"
                 "不然，那赵家的狗，何以看我两眼呢？\n"
                 "　　我怕得有理。\n")


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_chinese_utf16_without_a_bom_is_detected_though_its_zero_bytes_fall_on_both_sides(tmp_path, capsys, codec):
    raw = KUANGREN_RIJI.encode(codec)
    zeros = (raw[0::2].count(0), raw[1::2].count(0))  # the first of a pair, the second
    ascii_side, other_side = zeros[::-1] if codec == "utf-16-le" else zeros
    assert not ascii_side > 4 * other_side  # the line breaks' zero bytes alone do not tell the byte order
    (tmp_path / "diary.txt").write_bytes(raw)
    assert read_data_path(str(tmp_path / "diary.txt")).text == KUANGREN_RIJI
    assert f"is {codec.upper()} text; decoded it as such" in capsys.readouterr().err


def test_latin1_decoded_as_gb18030_says_what_was_assumed_shows_the_result_and_how_to_convert(tmp_path, capsys):
    raw = "Réglages du modèle\nDécoupage\n".encode("latin-1")  # each accent followed by a letter: valid GB18030
    path = tmp_path / "notes.txt"
    path.write_bytes(raw)
    read_data_path(str(path)).text
    err = capsys.readouterr().err
    garbled = raw.split(b"\n")[0].decode("gb18030")
    assert f"note: {path} is not UTF-8 (byte 1 is not); decoded it as GB18030/GBK" in err
    assert f"where it reads “{garbled}”. If that is garbled, the file is in another encoding" in err
    assert f"`iconv -f LATIN1 -t UTF-8 {path} > converted.txt`" in err


def test_a_stray_nul_byte_in_utf8_text_is_refused_not_taken_for_utf16(tmp_path):
    raw = ("The quick brown fox jumps over the lazy dog.\n" * 40).encode("utf-8")
    raw = raw[:101] + b"\0" + raw[102:]  # at an odd offset, where UTF-16-LE puts the zero byte of ASCII
    assert len(raw) % 2 == 0
    (tmp_path / "stray.txt").write_bytes(raw)
    with pytest.raises(UsageError, match=r"contains NUL characters \(at character 101\)"):
        read_data_path(str(tmp_path / "stray.txt")).text
