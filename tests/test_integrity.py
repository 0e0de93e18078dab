"""Offline resolution, explicit download and the model-directory integrity check.

Everything runs on tiny files built here (a config.yaml with the official v1.5 structure and small numbers,
torch.save'd dicts of tensors, a SentencePiece model trained on a few lines), a fake Hugging Face cache laid out
like huggingface_hub's, and a fake hub served from 127.0.0.1: no test touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from engine_ref.errors import ModelFilesError
from engine_ref.integrity import IntegrityReport, check_model_dir, human_size, render_report
from engine_ref.download import download_model
from engine_ref.hub_cache import hub_cache, parse_repo_ref, repo_of_cache_path, resolve_model

Files = dict[str, bytes]
MP = pytest.MonkeyPatch

REPO = "acme/tiny-tts"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
FAST_S = 2.0  # every local check and offline resolution must finish well within this

TINY_CONFIG = {
    "dataset": {
        "bpe_model": "bpe.model",
        "sample_rate": 24000,
        "squeeze": False,
        "mel": {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "win_length": 1024, "n_mels": 100,
                "mel_fmin": 0, "normalize": False},
    },
    "gpt": {
        "model_dim": 16, "max_mel_tokens": 20, "max_text_tokens": 20, "heads": 2, "use_mel_codes_as_input": True,
        "mel_length_compression": 1024, "layers": 1, "number_text_tokens": 64, "number_mel_codes": 18,
        "start_mel_token": 16, "stop_mel_token": 17, "start_text_token": 0, "stop_text_token": 1,
        "train_solo_embeddings": False, "condition_type": "conformer_perceiver",
        "condition_module": {"output_size": 8, "linear_units": 16, "attention_heads": 2, "num_blocks": 1,
                             "input_layer": "conv2d2", "perceiver_mult": 2},
    },
    "vqvae": {"channels": 100, "num_tokens": 16},  # training-only section, ignored like upstream's
    "bigvgan": {
        "adam_b1": 0.8, "resblock": "1", "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4],
        "upsample_initial_channel": 8, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
        "feat_upsample": False, "speaker_embedding_dim": 8, "cond_d_vector_in_each_upsampling_layer": True,
        "gpt_dim": 16, "activation": "snakebeta", "snake_logscale": True, "num_mels": 100, "n_fft": 1024,
        "hop_size": 256, "win_size": 1024, "sampling_rate": 24000, "fmin": 0, "fmax": None,
    },
    "dvae_checkpoint": "dvae.pth",
    "gpt_checkpoint": "gpt.pth",
    "bigvgan_checkpoint": "bigvgan_generator.pth",
    "version": 1.5,
}


def _torch_bytes(obj: object, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _bpe_bytes(vocab_size: int = 40) -> bytes:
    import sentencepiece as spm

    lines = ["HELLO WORLD THIS IS A TEST", "你 好 世 界", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(scope="session")
def model_files() -> dict[str, bytes]:
    """File name -> bytes of a small but structurally valid IndexTTS 1.5 model directory."""
    g = torch.Generator().manual_seed(0)
    gpt = {"model": {"text_embedding.weight": torch.randn(65, 16, generator=g),
                     "mel_head.weight": torch.randn(18, 16, generator=g)}}
    bigvgan = {"generator": {"conv_pre.weight_v": torch.randn(8, 16, 7, generator=g),
                             "conv_post.bias": torch.zeros(1)}}
    return {
        "config.yaml": yaml.safe_dump(TINY_CONFIG, sort_keys=False).encode(),
        "gpt.pth": _torch_bytes(gpt),
        "bigvgan_generator.pth": _torch_bytes(bigvgan),
        "bpe.model": _bpe_bytes(),
    }


def _write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def model_dir(tmp_path: Path, model_files: Files) -> Path:
    return _write_dir(tmp_path / "model", model_files)


def _blob_name(data: bytes, lfs: bool) -> str:
    """How the hub names cache blobs: sha256 for LFS files, the git blob sha1 for small ones."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return not name.endswith(".yaml")


def make_cache(cache: Path, repo: str, snapshots: dict[str, dict[str, bytes]], refs: dict[str, str]) -> Path:
    """A hub cache in huggingface_hub's layout: blobs by content hash, snapshot symlinks, refs files."""
    org, name = repo.split("/")
    folder = cache / f"models--{org}--{name}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, files in snapshots.items():
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            blob = _blob_name(data, _is_lfs(fname))
            (folder / "blobs" / blob).write_bytes(data)
            (snap / fname).symlink_to(Path("..", "..", "blobs", blob))
    for ref, commit in refs.items():
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No inherited hub settings; HOME points into tmp so the default cache is empty."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_ENDPOINT",
                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return monkeypatch


@contextmanager
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Any connection or DNS attempt is recorded and fails; the hub endpoint is unroutable anyway."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted in an offline code path")

    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:9")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts


def timed_check(path: Path, **kwargs: object) -> IntegrityReport:
    start = time.monotonic()
    report = check_model_dir(path, **kwargs)
    assert time.monotonic() - start < FAST_S
    return report


def row(report: IntegrityReport, role: str):
    return next(r for r in report.rows if r.role == role)


# --------------------------------------------------------------------------------------------------------------
# integrity: the valid directory and each corruption


def test_valid_dir_is_ok(model_dir: Path) -> None:
    report = timed_check(model_dir)
    assert report.ok, report.problems
    assert [r.role for r in report.rows] == ["config", "gpt", "bigvgan", "bpe"]
    assert report.version == "1.5"
    assert row(report, "gpt").detail == "2 tensors"
    assert row(report, "bpe").detail.endswith("pieces")
    assert all(r.size and r.size > 0 for r in report.rows)
    report.raise_for_problems()  # no-op
    assert check_model_dir(model_dir, deep=True).ok


def test_missing_file(model_dir: Path) -> None:
    (model_dir / "gpt.pth").unlink()
    report = timed_check(model_dir)
    r = row(report, "gpt")
    assert (r.status, r.size) == ("missing", None)
    assert [p.role for p in report.problems] == ["gpt"]
    with pytest.raises(ModelFilesError) as err:
        report.raise_for_problems()
    msg = str(err.value)
    assert "gpt.pth is missing" in msg and str(model_dir) in msg
    assert "IndexTeam/IndexTTS-1.5" in msg  # fix names where to get it
    assert "more problem" not in msg and "\n" not in msg


def test_several_problems_counted_in_one_line(model_dir: Path) -> None:
    (model_dir / "gpt.pth").write_bytes(b"")
    (model_dir / "bpe.model").write_bytes(os.urandom(300))
    report = timed_check(model_dir)
    assert [(p.role, p.status) for p in report.problems] == [("gpt", "empty"), ("bpe", "corrupt")]
    with pytest.raises(ModelFilesError) as err:
        report.raise_for_problems()
    msg = str(err.value)
    assert msg.startswith(f"{model_dir / 'gpt.pth'} is empty")
    assert "1 more problem" in msg and f"triton-tts verify {model_dir}" in msg and "\n" not in msg


def test_empty_file(model_dir: Path) -> None:
    (model_dir / "bigvgan_generator.pth").write_bytes(b"")
    r = row(timed_check(model_dir), "bigvgan")
    assert (r.status, r.size) == ("empty", 0)


def test_truncated_checkpoint(model_dir: Path, model_files: Files) -> None:
    data = model_files["gpt.pth"]
    (model_dir / "gpt.pth").write_bytes(data[: len(data) // 2])
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "truncated", r
    assert "cut off" in r.detail
    (model_dir / "gpt.pth").write_bytes(data[:-10])  # only the tail of the end record is gone
    assert row(timed_check(model_dir), "gpt").status == "truncated"


def test_member_past_end_of_file_is_truncated(model_dir: Path, model_files: Files) -> None:
    """Central directory intact but a member claims more bytes than the file has (preallocated/holey copies)."""
    data = bytearray(model_files["gpt.pth"])
    pos = data.rfind(b"PK\x01\x02")  # last central-directory entry
    struct.pack_into("<I", data, pos + 20, 0x7FFF_0000)  # its compressed size
    (model_dir / "gpt.pth").write_bytes(bytes(data))
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "truncated" and "past the end of the file" in r.detail


def test_garbage_checkpoint(model_dir: Path) -> None:
    (model_dir / "bigvgan_generator.pth").write_bytes(b"<html>rate limited</html>" + os.urandom(200))
    r = row(timed_check(model_dir), "bigvgan")
    assert r.status == "corrupt" and "not a torch.save zip archive" in r.detail
    assert "IndexTeam/IndexTTS-1.5" in r.fix


def test_zip_that_is_not_a_checkpoint(model_dir: Path) -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    (model_dir / "gpt.pth").write_bytes(buf.getvalue())
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "corrupt" and "data.pkl" in r.detail


def test_legacy_format_is_reported_with_resave_fix(model_dir: Path) -> None:
    legacy = _torch_bytes({"w": torch.ones(2)}, _use_new_zipfile_serialization=False)
    (model_dir / "gpt.pth").write_bytes(legacy)
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "corrupt" and "legacy" in r.detail and "torch.save" in r.fix


class Opaque:
    """A non-tensor object: weights-only loading must refuse it."""


def test_pickle_with_objects_is_refused(model_dir: Path) -> None:
    (model_dir / "gpt.pth").write_bytes(_torch_bytes({"model": {"w": torch.ones(2)}, "extra": Opaque()}))
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "corrupt" and "weights-only" in r.detail


def test_damaged_pickle_inside_valid_zip(model_dir: Path) -> None:
    import zipfile

    src = io.BytesIO(_torch_bytes({"w": torch.ones(2)}))
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)
    (model_dir / "gpt.pth").write_bytes(out.getvalue())
    r = row(timed_check(model_dir), "gpt")
    assert r.status == "corrupt" and "torch.load cannot read it" in r.detail


def test_bigvgan_without_generator_entry(model_dir: Path) -> None:
    (model_dir / "bigvgan_generator.pth").write_bytes(_torch_bytes({"discriminator": {"w": torch.ones(1)}}))
    r = row(timed_check(model_dir), "bigvgan")
    assert r.status == "corrupt" and "'generator'" in r.detail and "discriminator" in r.fix


def test_state_dict_without_tensors(model_dir: Path) -> None:
    (model_dir / "gpt.pth").write_bytes(_torch_bytes({"model": {"step": 3}}))
    assert row(timed_check(model_dir), "gpt").status == "corrupt"


def test_corrupt_bpe(model_dir: Path, model_files: Files) -> None:
    (model_dir / "bpe.model").write_bytes(model_files["bpe.model"][:1000])
    r = row(timed_check(model_dir), "bpe")
    assert r.status == "corrupt" and "SentencePiece" in r.detail


def test_bpe_larger_than_text_vocab(model_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["gpt"]["number_text_tokens"] = 10
    (model_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = row(timed_check(model_dir), "bpe")
    assert r.status == "corrupt" and "number_text_tokens is 10" in r.detail


def test_config_missing_key_still_checks_the_rest(model_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY_CONFIG))
    del cfg["gpt"]["layers"]
    cfg["gpt_checkpoint"] = "renamed.pth"
    (model_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = timed_check(model_dir)
    r = row(report, "config")
    assert r.status == "corrupt" and "gpt.layers" in r.detail and r.fix
    assert report.version is None
    assert row(report, "gpt").file == "renamed.pth" and row(report, "gpt").status == "missing"
    assert row(report, "bpe").ok and row(report, "bigvgan").ok
    with pytest.raises(ModelFilesError, match=r"config.yaml is corrupt: .*gpt\.layers.*1 more problem"):
        report.raise_for_problems()


def test_config_missing_and_not_yaml(model_dir: Path) -> None:
    (model_dir / "config.yaml").write_text("gpt: [unclosed")
    assert row(timed_check(model_dir), "config").status == "corrupt"
    (model_dir / "config.yaml").unlink()
    report = timed_check(model_dir)
    assert row(report, "config").status == "missing"
    assert [r.file for r in report.rows[1:]] == ["gpt.pth", "bigvgan_generator.pth", "bpe.model"]


def test_file_names_come_from_config(model_dir: Path) -> None:
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["bigvgan_checkpoint"] = "vocoder.pth"
    (model_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (model_dir / "bigvgan_generator.pth").rename(model_dir / "vocoder.pth")
    assert timed_check(model_dir).ok


def test_directory_itself_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="does not exist"):
        check_model_dir(tmp_path / "nope")


def test_fast_check_reads_no_tensor_data(tmp_path: Path, model_files: Files) -> None:
    """The fast check must stay at seconds for multi-GB files: it reads headers, not tensor bytes."""
    if not Path("/proc/self/io").exists():
        pytest.skip("needs Linux /proc/self/io to count bytes read")
    files = dict(model_files)
    files["gpt.pth"] = _torch_bytes({"model": {"big": torch.zeros(16 << 20, dtype=torch.uint8)}})  # 16 MiB
    model = _write_dir(tmp_path / "m", files)

    def rchar() -> int:
        text = Path("/proc/self/io").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))

    before = rchar()
    assert check_model_dir(model).ok
    fast = rchar() - before
    before = rchar()
    assert check_model_dir(model, deep=True).ok
    deep = rchar() - before
    assert fast < 4 << 20, fast
    assert deep > 16 << 20, deep


def test_deep_check_catches_flipped_bytes(model_dir: Path, model_files: Files) -> None:
    data = bytearray(model_files["gpt.pth"])
    pos = data.find(b"data/0") + 200  # inside the first tensor's bytes
    data[pos] ^= 0xFF
    (model_dir / "gpt.pth").write_bytes(bytes(data))
    assert row(check_model_dir(model_dir), "gpt").ok  # the fast check cannot see it
    r = row(check_model_dir(model_dir, deep=True), "gpt")
    assert r.status == "corrupt" and "CRC" in r.detail


def test_render_report(model_dir: Path) -> None:
    from rich.console import Console

    (model_dir / "gpt.pth").unlink()
    console = Console(record=True, width=200)
    console.print(render_report(check_model_dir(model_dir)))
    text = console.export_text()
    for expected in ("role", "detail / fix", "gpt.pth", "missing", "bpe.model", "ok", "fix: copy gpt.pth"):
        assert expected in text, expected
    assert human_size(0) == "0 B" and human_size(1536) == "1.5 KB" and human_size(3 << 30) == "3.0 GB"


# --------------------------------------------------------------------------------------------------------------
# integrity inside a hub cache


def test_cache_snapshot_ok_and_links(tmp_path: Path, model_files: Files) -> None:
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    snap = folder / "snapshots" / COMMIT_A
    assert (snap / "gpt.pth").is_symlink()
    assert timed_check(snap).ok
    assert check_model_dir(snap, deep=True).ok  # blob names match content hashes


def test_broken_snapshot_link(tmp_path: Path, model_files: Files) -> None:
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    blob = folder / "blobs" / _blob_name(model_files["bigvgan_generator.pth"], lfs=True)
    blob.unlink()
    report = timed_check(folder / "snapshots" / COMMIT_A)
    r = row(report, "bigvgan")
    assert r.status == "broken-link" and str(blob) in r.detail
    assert f"triton-tts download {REPO}" in r.fix


def test_incomplete_blob_next_to_broken_link(tmp_path: Path, model_files: Files) -> None:
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    blob = folder / "blobs" / _blob_name(model_files["gpt.pth"], lfs=True)
    blob.rename(blob.with_name(blob.name + ".incomplete"))
    r = row(timed_check(folder / "snapshots" / COMMIT_A), "gpt")
    assert r.status == "incomplete-download" and "partial blob" in r.detail and ".incomplete" in r.detail
    with pytest.raises(ModelFilesError, match=f"interrupted download.*triton-tts download {REPO}"):
        check_model_dir(folder / "snapshots" / COMMIT_A).raise_for_problems()


def test_missing_link_with_partial_blob(tmp_path: Path, model_files: Files) -> None:
    """How huggingface_hub leaves an interrupted download: no snapshot link yet, a partial blob."""
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    snap = folder / "snapshots" / COMMIT_A
    (snap / "gpt.pth").unlink()
    blob = folder / "blobs" / _blob_name(model_files["gpt.pth"], lfs=True)
    blob.rename(blob.with_name(blob.name + ".incomplete"))
    r = row(timed_check(snap), "gpt")
    assert r.status == "incomplete-download" and str(folder / "blobs") in r.detail


def test_local_dir_download_partial(model_dir: Path) -> None:
    """`hf download --local-dir` keeps partial files under .cache/huggingface/download/."""
    (model_dir / "gpt.pth").unlink()
    partial = model_dir / ".cache" / "huggingface" / "download"
    partial.mkdir(parents=True)
    (partial / "x1y2.abcdef.incomplete").write_bytes(b"\0" * 100)
    assert row(timed_check(model_dir), "gpt").status == "incomplete-download"


def test_deep_check_catches_modified_blob(tmp_path: Path, model_files: Files) -> None:
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    blob = folder / "blobs" / _blob_name(model_files["config.yaml"], lfs=False)
    blob.write_bytes(model_files["config.yaml"] + b"# edited\n")
    snap = folder / "snapshots" / COMMIT_A
    assert check_model_dir(snap).ok
    r = row(check_model_dir(snap, deep=True), "config")
    assert r.status == "corrupt" and "blob name" in r.detail


# --------------------------------------------------------------------------------------------------------------
# resolve_model: offline only


def test_resolve_local_dir(model_dir: Path, clean_env: MP) -> None:
    assert resolve_model(model_dir) == model_dir.absolute()
    assert resolve_model(str(model_dir)) == model_dir.absolute()
    clean_env.chdir(model_dir.parent)
    assert resolve_model("model") == model_dir.absolute()


def test_resolve_path_errors(model_dir: Path, clean_env: MP) -> None:
    with pytest.raises(ModelFilesError, match="is a file, not a model directory"):
        resolve_model(model_dir / "gpt.pth")
    with pytest.raises(ModelFilesError, match=r"model directory .*nope/deeper/dir does not exist"):
        resolve_model(str(model_dir / "nope" / "deeper" / "dir"))
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model("./relative-missing")
    with pytest.raises(ModelFilesError, match="not a repo id"):
        resolve_model("justaname")
    with pytest.raises(ModelFilesError, match="empty"):
        resolve_model("  ")
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model(Path("acme/tiny-tts"))  # a Path is always a path, never a repo id


def test_resolve_from_hf_home(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    make_cache(tmp_path / "hfhome" / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    clean_env.setenv("HF_HOME", str(tmp_path / "hfhome"))
    with no_network(clean_env) as attempts:
        start = time.monotonic()
        snap = resolve_model(REPO)
        assert time.monotonic() - start < FAST_S
    assert attempts == []
    assert snap == tmp_path / "hfhome" / "hub" / "models--acme--tiny-tts" / "snapshots" / COMMIT_A
    assert check_model_dir(snap).ok
    assert repo_of_cache_path(snap) == REPO


def test_resolve_hub_cache_beats_hf_home_and_cache_dir_beats_both(
    tmp_path: Path, model_files: Files, clean_env: MP
) -> None:
    make_cache(tmp_path / "home_cache" / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    make_cache(tmp_path / "hub_cache", REPO, {COMMIT_B: model_files}, {"main": COMMIT_B})
    make_cache(tmp_path / "explicit", REPO, {"c" * 40: model_files}, {"main": "c" * 40})
    clean_env.setenv("HF_HOME", str(tmp_path / "home_cache"))
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    with no_network(clean_env) as attempts:
        assert resolve_model(REPO).name == COMMIT_B
        assert resolve_model(REPO, cache_dir=str(tmp_path / "explicit")).name == "c" * 40
        assert hub_cache().source == "from HF_HUB_CACHE"
    assert attempts == []


def test_resolve_matches_huggingface_hub_layout(
    tmp_path: Path, model_files: Files, clean_env: MP
) -> None:
    """Our reading of the cache agrees with huggingface_hub's own offline lookup on the same fake cache."""
    from huggingface_hub import try_to_load_from_cache

    make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    theirs = try_to_load_from_cache(REPO, "config.yaml", cache_dir=str(tmp_path / "hub"))
    assert isinstance(theirs, str)
    assert Path(theirs).parent == resolve_model(REPO, cache_dir=tmp_path / "hub")


def test_resolve_revisions(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    cache = tmp_path / "hub"
    make_cache(cache, REPO, {COMMIT_A: model_files, COMMIT_B: model_files}, {"main": COMMIT_A, "v1.0": COMMIT_B})
    with no_network(clean_env) as attempts:
        assert resolve_model(REPO, cache_dir=cache).name == COMMIT_A
        assert resolve_model(f"{REPO}@main", cache_dir=cache).name == COMMIT_A
        assert resolve_model(f"{REPO}@v1.0", cache_dir=cache).name == COMMIT_B
        assert resolve_model(f"{REPO}@{COMMIT_B}", cache_dir=cache).name == COMMIT_B
        assert resolve_model(f"{REPO}@bbbbbbb", cache_dir=cache).name == COMMIT_B
        with pytest.raises(ModelFilesError) as err:
            resolve_model(f"{REPO}@v2", cache_dir=cache)
    assert attempts == []
    msg = str(err.value)
    assert "revision 'v2'" in msg and "cached revisions: main, v1.0" in msg
    assert f"triton-tts download {REPO}@v2" in msg


def test_resolve_ref_to_missing_snapshot(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    cache = tmp_path / "hub"
    make_cache(cache, REPO, {COMMIT_A: model_files}, {"main": COMMIT_A, "v2": COMMIT_B})
    with pytest.raises(ModelFilesError, match="missing"):
        resolve_model(f"{REPO}@v2", cache_dir=cache)


def test_resolve_single_snapshot_without_ref(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    cache = tmp_path / "hub"
    make_cache(cache, REPO, {COMMIT_A: model_files}, {})
    assert resolve_model(REPO, cache_dir=cache).name == COMMIT_A


def test_resolve_cache_repo_folder_given_as_path(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    folder = make_cache(tmp_path / "hub", REPO, {COMMIT_A: model_files, COMMIT_B: {}}, {"main": COMMIT_A})
    assert resolve_model(folder) == folder / "snapshots" / COMMIT_A
    assert resolve_model(folder / "snapshots" / COMMIT_B) == folder / "snapshots" / COMMIT_B


def test_resolve_not_found_is_fast_and_offline(tmp_path: Path, clean_env: MP) -> None:
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with no_network(clean_env) as attempts:
        start = time.monotonic()
        with pytest.raises(ModelFilesError) as err:
            resolve_model("IndexTeam/IndexTTS-1.5")
        assert time.monotonic() - start < FAST_S
    assert attempts == []
    msg = str(err.value)
    assert str(tmp_path / "empty-hub") in msg and "HF_HUB_CACHE" in msg
    assert "triton-tts download IndexTeam/IndexTTS-1.5" in msg and "--model DIR" in msg
    assert "\n" not in msg


def test_resolve_default_cache_location(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    make_cache(tmp_path / "home" / ".cache" / "huggingface" / "hub", REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    assert resolve_model(REPO).name == COMMIT_A
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(ModelFilesError, match="XDG_CACHE_HOME"):
        resolve_model(REPO)


def test_parse_repo_ref() -> None:
    assert parse_repo_ref("IndexTeam/IndexTTS-1.5") == ("IndexTeam/IndexTTS-1.5", None)
    assert parse_repo_ref("IndexTeam/IndexTTS-1.5@refs/pr/1") == ("IndexTeam/IndexTTS-1.5", "refs/pr/1")
    for bad in ("a/b/c", "a--b/c", "a/b@", "a/b@../x", "/abs/path"):
        with pytest.raises(ModelFilesError):
            parse_repo_ref(bad)


# --------------------------------------------------------------------------------------------------------------
# download_model: the only network code, tested against 127.0.0.1 only


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_unreachable_endpoint_fails_fast(tmp_path: Path, clean_env: MP) -> None:
    clean_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(ModelFilesError) as err:
        download_model(REPO, cache_dir=str(tmp_path / "hub"), timeout_s=2, progress=False)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert f"cannot download {REPO}@main" in msg and "127.0.0.1" in msg
    assert "HF_ENDPOINT" in msg and "--model DIR" in msg and "\n" not in msg


def test_download_silent_endpoint_times_out(tmp_path: Path, clean_env: MP) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        clean_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(ModelFilesError, match=r"did not answer within 1 s"):
            download_model(REPO, cache_dir=str(tmp_path / "hub"), timeout_s=1, progress=False)
        assert time.monotonic() - start < 5
    finally:
        listener.close()


def test_download_refuses_in_offline_mode(tmp_path: Path, clean_env: MP) -> None:
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE"):
        download_model(REPO, cache_dir=str(tmp_path / "hub"), progress=False)


class FakeHub:
    """Just enough of the hub HTTP API for huggingface_hub: model info, HEAD and GET on resolve URLs."""

    def __init__(self, files: dict[str, bytes], commit: str = COMMIT_A, slow: bool = False):
        self.files, self.commit, self.slow = files, commit, slow
        self.gets: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not with_body:
                    return
                if hub.slow:
                    for i in range(0, len(body), 1024):
                        self.wfile.write(body[i : i + 1024])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(body)

            def _route(self, with_body: bool) -> None:
                path = self.path.split("?")[0]
                api = f"/api/models/{REPO}/revision/"
                if path.startswith(api):
                    info = {"id": REPO, "modelId": REPO, "sha": hub.commit, "private": False,
                            "siblings": [{"rfilename": n} for n in hub.files]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, with_body)
                    return
                prefix = f"/{REPO}/resolve/"
                if not path.startswith(prefix):
                    self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, with_body)
                    return
                _rev, _, name = path[len(prefix) :].partition("/")
                data = hub.files.get(name)
                if data is None:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.commit}, with_body)
                    return
                etag = _blob_name(data, _is_lfs(name))
                headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{etag}"'}
                if _is_lfs(name):
                    headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
                if with_body:
                    hub.gets.append(name)
                self._send(200, data, headers, with_body)

            def do_HEAD(self) -> None:
                self._route(with_body=False)

            def do_GET(self) -> None:
                self._route(with_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _repo_files(model_files: Files) -> dict[str, bytes]:
    """The official repos also carry files inference never opens."""
    return {**model_files, "bigvgan_discriminator.pth": _torch_bytes({"w": torch.ones(4)}),
            "dvae.pth": b"unused", "README.md": b"# tiny"}


def test_download_then_resolve_offline(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    cache = tmp_path / "hub"
    with FakeHub(_repo_files(model_files)) as hub:
        clean_env.setenv("HF_ENDPOINT", hub.url)
        snap = download_model(REPO, cache_dir=str(cache), timeout_s=5, progress=False)
    assert sorted(hub.gets) == sorted(model_files)  # only config.yaml and the files it names
    assert snap == cache / "models--acme--tiny-tts" / "snapshots" / COMMIT_A
    assert (cache / "models--acme--tiny-tts" / "refs" / "main").read_text() == COMMIT_A
    assert check_model_dir(snap, deep=True).ok
    with no_network(clean_env) as attempts:
        assert resolve_model(REPO, cache_dir=cache) == snap
    assert attempts == []


def test_download_extra_patterns(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    with FakeHub(_repo_files(model_files)) as hub:
        clean_env.setenv("HF_ENDPOINT", hub.url)
        snap = download_model(
            f"{REPO}@main", cache_dir=str(tmp_path / "hub"), allow_patterns=("*.pth",), progress=False
        )
    assert "bigvgan_discriminator.pth" in hub.gets and "dvae.pth" in hub.gets and "README.md" not in hub.gets
    assert (snap / "bigvgan_discriminator.pth").is_file()


def test_download_verifies_what_it_got(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    files = dict(model_files)
    files["gpt.pth"] = files["gpt.pth"][: len(files["gpt.pth"]) // 2]  # the server itself holds a cut file
    with FakeHub(files) as hub:
        clean_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFilesError, match=r"gpt\.pth is truncated.*triton-tts download acme/tiny-tts"):
            download_model(REPO, cache_dir=str(tmp_path / "hub"), progress=False)


def test_download_repo_without_config(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    files = {k: v for k, v in model_files.items() if k != "config.yaml"}
    with FakeHub(files) as hub:
        clean_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFilesError, match="no config.yaml"):
            download_model(REPO, cache_dir=str(tmp_path / "hub"), progress=False)


def test_download_unknown_repo(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    with FakeHub(model_files) as hub:
        clean_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFilesError, match="repo acme/other does not exist"):
            download_model("acme/other", cache_dir=str(tmp_path / "hub"), progress=False)


def test_download_overall_deadline(tmp_path: Path, model_files: Files, clean_env: MP) -> None:
    with FakeHub(model_files, slow=True) as hub:  # ~20 KB/s: the checkpoints would take many seconds
        clean_env.setenv("HF_ENDPOINT", hub.url)
        start = time.monotonic()
        with pytest.raises(ModelFilesError, match=r"did not finish within the 1 s deadline.*run the command again"):
            download_model(REPO, cache_dir=str(tmp_path / "hub"), deadline_s=1, timeout_s=5, progress=False)
        assert time.monotonic() - start < 3


def test_download_argument_errors(tmp_path: Path, clean_env: MP) -> None:
    with pytest.raises(ModelFilesError, match="not a Hugging Face repo id"):
        download_model("not a repo", cache_dir=str(tmp_path))
    with pytest.raises(ModelFilesError, match="positive"):
        download_model(REPO, cache_dir=str(tmp_path), timeout_s=0)



def test_download_failure_points_at_cached_copy(
    tmp_path: Path, model_files: Files, clean_env: MP
) -> None:
    cache = tmp_path / "hub"
    make_cache(cache, REPO, {COMMIT_A: model_files}, {"main": COMMIT_A})
    clean_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelFilesError, match=f"cached copy already exists at .*{COMMIT_A}"):
        download_model(REPO, cache_dir=str(cache), timeout_s=2, progress=False)
