"""IndexTTS2 installs: offline dependency resolution (flat and hub layouts), the integrity table, family detection,
`verify` exit codes and the explicit download of the main repo plus missing dependencies.

Every install here is tiny but structurally real (torch.save zips, safetensors written by the `safetensors`
library, a trained SentencePiece model, JSON/YAML), laid out as upstream and huggingface_hub lay them out. No test
touches the internet: offline paths run with every socket call made to fail loudly, and downloads go to a fake hub
served from 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from engine_ref.errors import ConfigError, InputError, ModelFilesError
from engine_ref.families import check_install, detect_family, require_family
from engine_ref.indextts2.hub import DEPENDENCIES, dependencies_for, resolve_dependencies
from engine_ref.indextts2.integrity import check_indextts2_dir, check_tiktoken
from engine_ref.integrity import IntegrityReport, check_safetensors, render_report

FAST_S = 2.0
COMMIT = "c" * 40
Files = dict[str, bytes]
HUB_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "HF_TOKEN")


# --------------------------------------------------------------------------------------------------------------
# environment: clean hub settings, restored afterwards (resolve_dependencies switches the process offline)


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    import huggingface_hub.constants as constants

    saved_env = {k: os.environ.get(k) for k in HUB_VARS}
    saved_offline = constants.HF_HUB_OFFLINE
    for var in HUB_VARS:
        os.environ.pop(var, None)
    constants.HF_HUB_OFFLINE = False  # an earlier test's loader may have switched this process offline
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield monkeypatch
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    constants.HF_HUB_OFFLINE = saved_offline


@contextmanager
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every connection or DNS attempt is recorded and raises."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted in an offline code path")

    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", refuse)
        m.setattr(socket.socket, "connect_ex", refuse)
        m.setattr(socket, "create_connection", refuse)
        m.setattr(socket, "getaddrinfo", refuse)
        yield attempts


# --------------------------------------------------------------------------------------------------------------
# tiny installs


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape)


def v2_config(version: float = 2.0, text_tokens: int = 64, two_five: bool = False) -> dict:
    cfg = {
        "dataset": {"bpe_model": "bpe.model"},
        "gpt": {"model_dim": 8, "layers": 1, "heads": 2, "max_mel_tokens": 10, "max_text_tokens": 10,
                "number_text_tokens": text_tokens, "number_mel_codes": 18, "start_mel_token": 16,
                "stop_mel_token": 17, "start_text_token": 0, "stop_text_token": 1},
        "semantic_codec": {"codebook_size": 16, "hidden_size": 12, "codebook_dim": 4, "vocos_dim": 6,
                           "vocos_intermediate_dim": 8, "vocos_num_layers": 1},
        "s2mel": {
            "preprocess_params": {"sr": 22050, "spect_params": {"n_fft": 1024, "win_length": 1024,
                                                                "hop_length": 256, "n_mels": 10, "fmin": 0,
                                                                "fmax": "None"}},
            "style_encoder": {"dim": 6},
            "length_regulator": {"channels": 8, "is_discrete": False, "in_channels": 12,
                                 "content_codebook_size": 32, "sampling_ratios": [1, 1], "n_codebooks": 1},
            "DiT": {"hidden_dim": 8, "num_heads": 2, "depth": 1, "in_channels": 10, "style_condition": True,
                    "final_layer_type": "wavenet", "content_dim": 8},
            "wavenet": {"hidden_dim": 8, "num_layers": 1, "kernel_size": 5, "dilation_rate": 1},
        },
        "gpt_checkpoint": "gpt.pth", "w2v_stat": "wav2vec2bert_stats.pt", "s2mel_checkpoint": "s2mel.pth",
        "emo_matrix": "feat2.pt", "spk_matrix": "feat1.pt", "emo_num": [1, 2],
        "qwen_emo_path": "qwen0.6bemo4-merge/",
        "vocoder": {"type": "bigvgan", "name": "nvidia/bigvgan_v2_22khz_80band_256x"},
        "version": version,
    }
    if two_five:
        del cfg["dataset"]
        cfg["vocoder"] = {"name": "bigvgan_generator.pt"}
    return cfg


def _gpt_state(two_five: bool) -> dict:
    state = {"text_embedding.weight": _t(65, 8), "mel_embedding.weight": _t(18, 8),
             "gpt.h.0.attn.c_attn.weight": _t(8, 24), "emo_layer.weight": _t(8, 8)}
    if two_five:
        state |= {"spk_emb_proj.weight": _t(8, 6), "lang_embedding.weight": _t(107, 8)}
    else:
        state["speed_emb.weight"] = _t(2, 8)
    return state


def _s2mel(two_five: bool) -> dict:
    net = {
        "cfm": {"module.estimator.cond_x_merge_linear.weight": _t(8, 34),  # DDP prefix, as upstream's files
                "module.estimator.conv2.weight": _t(10, 8, 1)},
        "length_regulator": {"content_in_proj.weight": _t(8, 12)},
    }
    if not two_five:
        net["gpt_layer"] = {"0.weight": _t(256, 8)}
    return {"net": net, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 3}


def _tiktoken(n: int = 20) -> bytes:
    return b"".join(base64.b64encode(f"tok{i}".encode()) + f" {i}\n".encode() for i in range(n))


@pytest.fixture(scope="session")
def bpe_model() -> bytes:
    import sentencepiece as spm

    lines = ["HELLO WORLD THIS IS A TEST", "你 好 世 界", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=40,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def main_files(bpe: bytes, family: str = "indextts2", config: dict | None = None) -> Files:
    two_five = family == "indextts2.5"
    cfg = config or v2_config(2.5 if two_five else 2.0, two_five=two_five)
    files = {
        "config.yaml": yaml.safe_dump(cfg, sort_keys=False).encode(),
        "gpt.pth": _torch_bytes(_gpt_state(two_five)),
        "s2mel.pth": _torch_bytes(_s2mel(two_five)),
        "wav2vec2bert_stats.pt": _torch_bytes({"mean": _t(16), "var": torch.ones(16)}),
        "feat1.pt": _torch_bytes(_t(3, 6)),
        "feat2.pt": _torch_bytes(_t(3, 8)),
    }
    if two_five:
        files["codec.pth"] = _torch_bytes({"model": {"quantizer.quantizers.0.codebook.weight": _t(16, 4)}})
        files["multilingual_zh_ja_yue_char_del.tiktoken"] = _tiktoken()
    else:
        files["bpe.model"] = bpe
    return files


W2V_CONFIG = {"model_type": "wav2vec2-bert", "hidden_size": 16, "num_hidden_layers": 17,
              "feature_projection_input_dim": 160, "intermediate_size": 32}


def _w2v_weights(layers: int = 17, hidden: int = 16) -> bytes:
    state = {"feature_projection.projection.weight": _t(hidden, 160)}
    for i in range(layers):
        state[f"encoder.layers.{i}.ffn1.intermediate_dense.weight"] = _t(32, hidden)
    return safetensors_bytes(state)


@pytest.fixture(scope="session")
def dep_files() -> dict[str, dict[str, bytes]]:
    """Dependency key -> role -> bytes."""
    return {
        "w2v_bert": {
            "config": json.dumps(W2V_CONFIG).encode(),
            "preprocessor": json.dumps({"feature_size": 80, "padding_value": 1, "stride": 2}).encode(),
            "weights": _w2v_weights(),
        },
        "semantic_codec": {"weights": safetensors_bytes({"quantizer.quantizers.0.codebook.weight": _t(16, 4),
                                                         "encoder.0.embed.weight": _t(6, 12, 7)})},
        "campplus": {"weights": _torch_bytes({"head.conv1.weight": _t(32, 1, 3, 3),
                                              "xvector.dense.linear.weight": _t(6, 1024, 1)})},
        "bigvgan": {
            "config": json.dumps({"num_mels": 10, "sampling_rate": 22050, "upsample_initial_channel": 12}).encode(),
            "weights": _torch_bytes({"generator": {"conv_pre.weight_v": _t(12, 10, 7),
                                                   "conv_pre.weight_g": _t(12, 1, 1)}}),
        },
    }


def write_files(root: Path, files: Files) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_flat(model_dir: Path, dep_files: dict, keys: tuple[str, ...]) -> None:
    for dep in DEPENDENCIES:
        if dep.key in keys:
            write_files(model_dir / "hf_cache", {f.flat_path: dep_files[dep.key][f.role] for f in dep.files})


def _blob_name(data: bytes, lfs: bool) -> str:
    return hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_cache_repo(cache: Path, repo: str, files: Files, commit: str = COMMIT, ref: bool = True) -> Path:
    """huggingface_hub's layout: blobs named by content hash, snapshot symlinks into ../../blobs, refs/main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap = folder / "snapshots" / commit
    for name, data in files.items():
        blob = _blob_name(data, lfs=not name.endswith((".json", ".yaml")))
        (folder / "blobs" / blob).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(folder / "blobs" / blob, link.parent))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return folder


def write_hub(cache: Path, dep_files: dict, keys: tuple[str, ...]) -> dict[str, Path]:
    return {
        dep.key: make_cache_repo(cache, dep.repo_id, {f.repo_path: dep_files[dep.key][f.role] for f in dep.files})
        for dep in DEPENDENCIES if dep.key in keys
    }


V2_KEYS = ("w2v_bert", "semantic_codec", "campplus", "bigvgan")
V25_KEYS = ("w2v_bert", "campplus", "bigvgan")


@pytest.fixture
def flat_install(tmp_path: Path, bpe_model: bytes, dep_files: dict) -> Path:
    root = write_files(tmp_path / "IndexTTS-2", main_files(bpe_model))
    write_flat(root, dep_files, V2_KEYS)
    return root


@pytest.fixture
def hub_install(tmp_path: Path, bpe_model: bytes, dep_files: dict) -> tuple[Path, Path]:
    root = write_files(tmp_path / "hub-install" / "IndexTTS-2", main_files(bpe_model))
    cache = tmp_path / "hub"
    write_hub(cache, dep_files, V2_KEYS)
    return root, cache


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    out = fn(*args, **kwargs)
    assert time.monotonic() - start < FAST_S
    return out


def rows_of(report: IntegrityReport, section_prefix: str) -> list:
    return [r for r in report.rows if r.section.startswith(section_prefix)]


def row(report: IntegrityReport, section_prefix: str, role: str):
    return next(r for r in rows_of(report, section_prefix) if r.role == role)


# --------------------------------------------------------------------------------------------------------------
# complete installs resolve offline, in both layouts


def test_flat_install_resolves_offline(flat_install: Path, hub_env: pytest.MonkeyPatch) -> None:
    with no_network(hub_env) as attempts:
        deps = timed(resolve_dependencies, flat_install)
        report = timed(check_indextts2_dir, flat_install)
    assert attempts == []
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # already imported: its constant is switched too
    assert deps.family == "indextts2"
    assert {k: d.layout for k, d in deps.deps.items()} == dict.fromkeys(V2_KEYS, "flat")
    hf = flat_install / "hf_cache"
    assert deps.w2v_bert_dir == hf / "w2v-bert-2.0"
    assert deps.semantic_codec_file == hf / "semantic_codec_model.safetensors"
    assert deps.campplus_file == hf / "campplus_cn_common.bin"
    assert deps.bigvgan_dir == hf / "bigvgan"
    assert report.ok, [r for r in report.problems]
    assert report.family == "indextts2" and report.version == "2.0"
    main = rows_of(report, "main")
    assert [r.role for r in main] == ["config", "gpt", "s2mel", "bpe", "w2v_stats", "spk_matrix", "emo_matrix",
                                      "qwen_emotion"]
    assert row(report, "main", "qwen_emotion").status == "optional-absent"
    assert "optional, absent" in row(report, "main", "qwen_emotion").detail
    assert {r.section for r in report.rows} >= {"facebook/w2v-bert-2.0 (flat)", "amphion/MaskGCT (flat)",
                                               "funasr/campplus (flat)", "nvidia/bigvgan_v2_22khz_80band_256x (flat)"}
    assert "official file has 3,484,663,079 B" in row(report, "main", "gpt").detail  # sizes reported, not failed
    assert row(report, "main", "s2mel").detail.startswith("net: cfm, length_regulator, gpt_layer")
    assert timed(check_indextts2_dir, flat_install, deep=True).ok


def test_hub_install_resolves_offline_from_each_cache_setting(
    hub_install: tuple[Path, Path], hub_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root, cache = hub_install
    snap = cache / "models--facebook--w2v-bert-2.0" / "snapshots" / COMMIT
    with no_network(hub_env) as attempts:
        explicit = timed(resolve_dependencies, root, cache_dir=cache)
        hub_env.setenv("HF_HUB_CACHE", str(cache))
        from_env = resolve_dependencies(root)
        hub_env.delenv("HF_HUB_CACHE")
        hub_env.setenv("HF_HOME", str(tmp_path / "elsewhere"))
        with pytest.raises(ModelFilesError, match="not installed"):
            resolve_dependencies(root)
        (tmp_path / "elsewhere").mkdir()
        cache.rename(tmp_path / "elsewhere" / "hub")
        from_home = resolve_dependencies(root)
    assert attempts == []
    assert explicit.w2v_bert_dir == snap and explicit["w2v_bert"].commit == COMMIT
    assert {d.layout for d in explicit.deps.values()} == {"hub"}
    assert from_env.semantic_codec_file == cache / "models--amphion--MaskGCT" / "snapshots" / COMMIT / \
        "semantic_codec" / "model.safetensors"
    assert from_home.campplus_file.parent.name == COMMIT and "HF_HOME" in from_home["campplus"].source
    assert check_indextts2_dir(root, cache_dir=tmp_path / "elsewhere" / "hub", deep=True).ok


def test_first_release_layout_hub_cache_inside_model_dir(
    tmp_path: Path, bpe_model: bytes, dep_files: dict, hub_env: pytest.MonkeyPatch
) -> None:
    """The first releases set HF_HUB_CACHE=./checkpoints/hf_cache: a hub cache inside the model directory."""
    root = write_files(tmp_path / "checkpoints", main_files(bpe_model))
    write_hub(root / "hf_cache", dep_files, V2_KEYS)
    with no_network(hub_env) as attempts:
        deps = resolve_dependencies(root)
    assert attempts == []
    assert deps.bigvgan_dir == root / "hf_cache" / "models--nvidia--bigvgan_v2_22khz_80band_256x" / "snapshots" / COMMIT
    assert "hf_cache/ of the model directory" in deps["bigvgan"].source
    assert check_indextts2_dir(root).ok


def test_mixed_layouts_and_flat_wins(flat_install: Path, tmp_path: Path, dep_files: dict) -> None:
    cache = tmp_path / "hub"
    write_hub(cache, dep_files, V2_KEYS)
    (flat_install / "hf_cache" / "campplus_cn_common.bin").unlink()  # only this one comes from the cache
    deps = resolve_dependencies(flat_install, cache_dir=cache)
    assert {k: d.layout for k, d in deps.deps.items()} == {"w2v_bert": "flat", "semantic_codec": "flat",
                                                           "campplus": "hub", "bigvgan": "flat"}
    assert check_indextts2_dir(flat_install, cache_dir=cache).ok


def test_indextts_2_5_bundled_hf_cache(tmp_path: Path, bpe_model: bytes, dep_files: dict) -> None:
    root = write_files(tmp_path / "IndexTTS-2.5", main_files(bpe_model, "indextts2.5"))
    write_flat(root, dep_files, V25_KEYS)
    assert [d.key for d in dependencies_for("indextts2.5")] == list(V25_KEYS)
    deps = resolve_dependencies(root)
    assert deps.family == "indextts2.5" and deps.semantic_codec_file is None and set(deps.deps) == set(V25_KEYS)
    report = check_indextts2_dir(root)
    assert report.ok, report.problems
    assert [r.role for r in rows_of(report, "main")] == ["config", "gpt", "s2mel", "codec", "tokenizer", "w2v_stats",
                                                         "spk_matrix", "emo_matrix", "qwen_emotion"]
    assert not rows_of(report, "amphion/MaskGCT")
    assert row(report, "main", "tokenizer").detail == "20 tokens"


def test_2_5_config_saying_2_0_with_absolute_paths(tmp_path: Path, bpe_model: bytes, dep_files: dict) -> None:
    """Reported (third-party) for the 2.5 hub config.yaml: version 2.0 and the authors' absolute paths."""
    cfg = v2_config(2.0, two_five=True)
    cfg["gpt_checkpoint"] = "/cubefs/internal/gpt.pth"
    root = write_files(tmp_path / "IndexTTS-2.5", main_files(bpe_model, "indextts2.5", cfg))
    write_flat(root, dep_files, V25_KEYS)
    assert detect_family(root) == "indextts2.5"
    report = check_indextts2_dir(root)
    assert report.ok, report.problems
    assert "version says 2.0" in row(report, "main", "config").detail
    gpt = row(report, "main", "gpt")
    assert gpt.path == str(root / "gpt.pth") and "config.yaml names /cubefs/internal/gpt.pth" in gpt.detail


# --------------------------------------------------------------------------------------------------------------
# each broken install names its problem within seconds


def test_dangling_snapshot_link(hub_install: tuple[Path, Path], dep_files: dict) -> None:
    root, cache = hub_install
    blob = cache / "models--facebook--w2v-bert-2.0" / "blobs" / _blob_name(dep_files["w2v_bert"]["weights"], True)
    blob.unlink()
    report = timed(check_indextts2_dir, root, cache_dir=cache)
    r = row(report, "facebook/w2v-bert-2.0 (hub)", "weights")
    assert r.status == "broken-link" and str(blob) in r.detail
    assert "triton-tts download IndexTeam/IndexTTS-2" in r.fix
    assert [p.role for p in report.problems] == ["weights"]
    with pytest.raises(ModelFilesError, match=r"model\.safetensors is a dangling snapshot link"):
        timed(resolve_dependencies, root, cache_dir=cache)
    with pytest.raises(ModelFilesError, match="is a broken link"):
        report.raise_for_problems()


def test_missing_dependency(flat_install: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-cache"
    (flat_install / "hf_cache" / "w2v-bert-2.0" / "model.safetensors").unlink()
    report = timed(check_indextts2_dir, flat_install, cache_dir=empty)
    r = row(report, "facebook/w2v-bert-2.0", "weights")
    assert (r.status, r.section) == ("missing", "facebook/w2v-bert-2.0 (flat)")
    assert "--layout flat --local-dir" in r.fix
    assert [p.section for p in report.problems] == ["facebook/w2v-bert-2.0 (flat)"]
    (flat_install / "hf_cache" / "campplus_cn_common.bin").unlink()
    report = timed(check_indextts2_dir, flat_install, cache_dir=empty)
    nothing = row(report, "funasr/campplus", "all")
    assert (nothing.status, nothing.section) == ("missing", "funasr/campplus (not found)")
    assert "is not installed" in nothing.detail and str(empty) in nothing.detail
    assert "hf_cache/{campplus_cn_common.bin}" in nothing.detail
    with pytest.raises(ModelFilesError) as err:
        timed(resolve_dependencies, flat_install, cache_dir=empty)
    msg = str(err.value)
    assert msg.startswith("facebook/w2v-bert-2.0 is incomplete in") and "model.safetensors is missing" in msg
    assert "triton-tts download IndexTeam/IndexTTS-2" in msg and "1 more dependency problem(s)" in msg
    assert "\n" not in msg


def test_missing_refs_main(hub_install: tuple[Path, Path]) -> None:
    root, cache = hub_install
    folder = cache / "models--nvidia--bigvgan_v2_22khz_80band_256x"
    (folder / "refs" / "main").unlink()
    report = timed(check_indextts2_dir, root, cache_dir=cache)
    r = row(report, "nvidia/bigvgan_v2_22khz_80band_256x (hub)", "refs")
    assert r.status == "missing-ref" and r.path == str(folder / "refs" / "main")
    assert "no refs/main" in r.detail and f"printf %s {COMMIT} > {folder / 'refs' / 'main'}" in r.fix
    with pytest.raises(ModelFilesError, match="refs/main is missing"):
        report.raise_for_problems()
    with pytest.raises(ModelFilesError, match="has no refs/main"):
        timed(resolve_dependencies, root, cache_dir=cache)
    (folder / "refs" / "main").write_text("d" * 40)  # a ref to a snapshot that is not there
    assert row(check_indextts2_dir(root, cache_dir=cache), "nvidia", "refs").status == "missing"


def test_truncated_safetensors_is_found_without_reading_it(flat_install: Path) -> None:
    path = flat_install / "hf_cache" / "w2v-bert-2.0" / "model.safetensors"
    data = safetensors_bytes({"feature_projection.projection.weight": _t(16, 160), "big": _t(4 << 20)})  # 16 MiB
    path.write_bytes(data[: len(data) // 2])

    def rchar() -> int:
        text = Path("/proc/self/io").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))

    before = rchar()
    report = timed(check_indextts2_dir, flat_install)
    read = rchar() - before
    r = row(report, "facebook/w2v-bert-2.0", "weights")
    assert r.status == "truncated" and "cut off" in r.detail, r
    assert read < 2 << 20, read  # headers only, never the tensor data
    with pytest.raises(ModelFilesError, match=r"model\.safetensors is truncated"):
        report.raise_for_problems()


def test_truncated_and_empty_main_files(flat_install: Path) -> None:
    gpt = flat_install / "gpt.pth"
    gpt.write_bytes(gpt.read_bytes()[:-40])
    (flat_install / "feat1.pt").write_bytes(b"")
    report = timed(check_indextts2_dir, flat_install)
    assert [(p.role, p.status) for p in report.problems] == [("gpt", "truncated"), ("spk_matrix", "empty")]
    assert "copy the file again from the official release IndexTeam/IndexTTS-2" in report.problems[0].fix


def test_wrong_shapes_are_named(flat_install: Path, dep_files: dict) -> None:
    (flat_install / "gpt.pth").write_bytes(_torch_bytes(_gpt_state(two_five=True)))  # a 2.5 gpt.pth in a 2.0 dir
    (flat_install / "wav2vec2bert_stats.pt").write_bytes(_torch_bytes({"mean": _t(1024), "var": _t(1024)}))
    bigvgan_cfg = flat_install / "hf_cache" / "bigvgan" / "config.json"
    bigvgan_cfg.write_text(json.dumps({"num_mels": 100, "sampling_rate": 24000, "upsample_initial_channel": 12}))
    (flat_install / "hf_cache" / "w2v-bert-2.0" / "model.safetensors").write_bytes(_w2v_weights(layers=12))
    report = timed(check_indextts2_dir, flat_install)
    gpt = row(report, "main", "gpt")
    assert gpt.status == "wrong-shape" and "has no 'speed_emb.weight'" in gpt.detail
    assert "looks like an IndexTTS-2.5 gpt.pth" in gpt.detail
    stats = row(report, "main", "w2v_stats")
    assert stats.status == "wrong-shape" and "'mean' is [1024], expected [16]" in stats.detail
    voc = row(report, "nvidia", "config")
    assert voc.status == "wrong-shape" and "num_mels is 100" in voc.detail
    w2v = row(report, "facebook", "weights")
    assert w2v.status == "wrong-shape" and "only 12 encoder layers" in w2v.detail
    generator = row(report, "nvidia", "weights")  # the generator no longer fits the edited config.json either
    assert generator.status == "wrong-shape"
    assert "'conv_pre.weight_v' is [12, 10, 7], expected [12, 100, 7]" in generator.detail
    assert len(report.problems) == 5


def test_s2mel_without_net_and_corrupt_json(flat_install: Path) -> None:
    (flat_install / "s2mel.pth").write_bytes(_torch_bytes({"model": {"w": _t(2)}}))
    (flat_install / "hf_cache" / "w2v-bert-2.0" / "preprocessor_config.json").write_text("{not json")
    report = check_indextts2_dir(flat_install)
    assert row(report, "main", "s2mel").status == "corrupt" and "no 'net' entry" in row(report, "main", "s2mel").detail
    assert row(report, "facebook", "preprocessor").status == "corrupt"


def test_broken_config_still_checks_the_rest(flat_install: Path) -> None:
    (flat_install / "config.yaml").write_text("gpt: [unclosed")
    report = check_indextts2_dir(flat_install)
    assert [(p.role, p.status) for p in report.problems] == [("config", "corrupt")]
    assert report.version is None and row(report, "main", "gpt").ok  # default names, no shape expectations
    (flat_install / "config.yaml").write_text("version: 2.0\ngpt: {model_dim: 8}\n")
    assert "no s2mel section" in row(check_indextts2_dir(flat_install), "main", "config").detail


def test_qwen_folder_checked_when_present(flat_install: Path) -> None:
    qwen = flat_install / "qwen0.6bemo4-merge"
    write_files(qwen, {"config.json": b"{}", "model.safetensors": safetensors_bytes({"w": _t(2)}),
                       "tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    report = check_indextts2_dir(flat_install)
    qrows = [r for r in report.rows if r.role == "qwen_emotion"]
    assert [r.file for r in qrows][:2] == ["qwen0.6bemo4-merge/config.json", "qwen0.6bemo4-merge/model.safetensors"]
    assert [(p.file, p.status) for p in report.problems] == [("qwen0.6bemo4-merge/generation_config.json", "missing")]
    assert "remove qwen0.6bemo4-merge/ to run without emotion from text" in report.problems[0].fix


def test_expect_official_sizes(flat_install: Path) -> None:
    report = check_indextts2_dir(flat_install, expect_official=True)
    assert not report.ok
    r = row(report, "main", "gpt")
    assert r.status == "wrong-size" and "3,484,663,079" in r.detail
    assert row(report, "main", "qwen_emotion").ok  # optional and absent: still fine


def test_campplus_legacy_format_accepted(flat_install: Path) -> None:
    """The format of campplus_cn_common.bin is not documented: pre-zip torch.save is accepted for it."""
    buf = io.BytesIO()
    torch.save({"head.conv1.weight": _t(32, 1, 3, 3), "xvector.dense.linear.weight": _t(6, 1024, 1)}, buf,
               _use_new_zipfile_serialization=False)
    (flat_install / "hf_cache" / "campplus_cn_common.bin").write_bytes(buf.getvalue())
    assert row(check_indextts2_dir(flat_install, deep=True), "funasr", "weights").ok


def test_render_report_sections(hub_install: tuple[Path, Path]) -> None:
    from rich.console import Console

    root, cache = hub_install
    (cache / "models--funasr--campplus" / "refs" / "main").unlink()
    console = Console(record=True, width=240)
    console.print(render_report(check_indextts2_dir(root, cache_dir=cache)))
    text = console.export_text()
    for expected in ("part", "main", "facebook/w2v-bert-2.0 (hub)", "funasr/campplus (hub)", "missing-ref",
                     "optional-absent", "(indextts2)"):
        assert expected in text, expected


# --------------------------------------------------------------------------------------------------------------
# file-level checkers against independent references


def test_safetensors_checker(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"a": _t(3, 4), "b": torch.zeros(5, dtype=torch.int64)}))
    with safe_open(str(path), framework="pt") as f:  # the library's own reading
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    seen = {}
    status, detail, _ = check_safetensors(path, lambda shapes: (seen.update(shapes), ("ok", "", None))[1])
    assert status == "ok" and seen == theirs == {"a": (3, 4), "b": (5,)}
    good = path.read_bytes()
    for data, want in ((good + b"\0" * 8, "corrupt"), (good[:-1], "truncated"), (good[:6], "truncated"),
                       (b"<html>rate limit</html>" * 4, "corrupt"), (good[:8] + b"{" * (len(good) - 8), "corrupt")):
        path.write_bytes(data)
        assert check_safetensors(path)[0] == want, data[:12]


def test_tiktoken_checker(tmp_path: Path) -> None:
    path = tmp_path / "v.tiktoken"
    path.write_bytes(_tiktoken(30))
    assert check_tiktoken(path, 64) == ("ok", "30 tokens", None)
    assert check_tiktoken(path, 10)[0] == "wrong-shape"
    path.write_bytes(b"not base64!! 3\n")
    assert check_tiktoken(path, None)[0] == "corrupt"


# --------------------------------------------------------------------------------------------------------------
# family detection


def test_detect_family(tmp_path: Path, flat_install: Path, bpe_model: bytes) -> None:
    v15 = write_files(tmp_path / "v15", {"config.yaml": b"version: 1.5\nbigvgan: {}\n", "gpt.pth": b"x",
                                         "bigvgan_generator.pth": b"x", "bpe.model": b"x"})
    v10 = write_files(tmp_path / "v10", {"config.yaml": b"gpt: {}\nbigvgan: {}\n", "gpt.pth": b"x"})
    only_files_25 = write_files(tmp_path / "v25", {"codec.pth": b"x", "x.tiktoken": b"x", "s2mel.pth": b"x"})
    half_25 = write_files(tmp_path / "half25", main_files(bpe_model, "indextts2.5"))
    (half_25 / "multilingual_zh_ja_yue_char_del.tiktoken").unlink()
    assert detect_family(v15) == "indextts"
    assert detect_family(v10) == "indextts"
    assert detect_family(flat_install) == "indextts2"
    assert detect_family(only_files_25) == "indextts2.5"
    assert detect_family(half_25) == "indextts2.5"
    assert check_indextts2_dir(half_25).problems[0].file == "multilingual_zh_ja_yue_char_del.tiktoken"
    config_only_25 = write_files(tmp_path / "cfg25", {"config.yaml": yaml.safe_dump(v2_config(2.5)).encode()})
    assert detect_family(config_only_25) == "indextts2.5"

    junk = write_files(tmp_path / "junk", {"notes.txt": b"hi", "model.onnx": b"x"})
    with pytest.raises(ModelFilesError, match=r"not an IndexTTS model directory: no config.yaml .*notes.txt"):
        detect_family(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesError, match="found nothing"):
        detect_family(tmp_path / "empty")
    w2v = write_files(tmp_path / "w2v", {"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(ModelFilesError, match="holds config.json"):
        detect_family(w2v)
    mixed = write_files(tmp_path / "mixed", {"config.yaml": b"version: 1.5\n", "s2mel.pth": b"x"})
    with pytest.raises(ModelFilesError, match="mixes releases: config.yaml is IndexTTS 1.x"):
        detect_family(mixed)
    future = write_files(tmp_path / "future", {"config.yaml": b"version: 3.0\n"})
    with pytest.raises(ConfigError, match="version 3.0"):
        detect_family(future)
    with pytest.raises(ModelFilesError, match="does not exist"):
        detect_family(tmp_path / "nope")

    with pytest.raises(InputError, match=r"--emo-ref needs an IndexTTS-2 or IndexTTS-2.5 model, but .* IndexTTS 1\.x"):
        require_family(v15, ("indextts2", "indextts2.5"), feature="--emo-ref")
    assert require_family(flat_install, ("indextts2", "indextts2.5"), feature="--emo-ref") == "indextts2"
    with pytest.raises(ModelFilesError, match="IndexTTS 1.x directory"):
        resolve_dependencies(v15)


def test_check_install_dispatches(tiny_model_dir: Path, flat_install: Path) -> None:
    v1 = check_install(tiny_model_dir)
    assert v1.ok and v1.family == "indextts" and [r.role for r in v1.rows] == ["config", "gpt", "bigvgan", "bpe"]
    assert check_install(flat_install).family == "indextts2"
    broken = write_files(tiny_model_dir.parent / "broken-1x", {"config.yaml": b"gpt: [unclosed", "gpt.pth": b"x"})
    report = check_install(broken)  # no release-specific file: the 1.x table names the config problem
    assert report.family == "indextts" and [r.status for r in report.rows[:2]] == ["corrupt", "corrupt"]
    with pytest.raises(ModelFilesError, match="not an IndexTTS model directory"):
        check_install(write_files(tiny_model_dir.parent / "junk-dir", {"a.txt": b"x"}))


# --------------------------------------------------------------------------------------------------------------
# the CLI


def test_verify_cli_exit_codes(flat_install: Path, hub_install: tuple[Path, Path], tmp_path: Path,
                               tiny_model_dir: Path, capsys: pytest.CaptureFixture,
                               hub_env: pytest.MonkeyPatch) -> None:
    from triton_tts.cli import main

    hub_env.setenv("COLUMNS", "250")  # rich wraps at the terminal width

    assert main(["verify", str(flat_install)]) == 0
    out = capsys.readouterr().out
    assert "is complete" in out and "amphion/MaskGCT (flat)" in out
    root, cache = hub_install
    assert main(["doctor", str(root), "--cache-dir", str(cache), "--deep"]) == 0
    assert "funasr/campplus (hub)" in capsys.readouterr().out
    assert main(["verify", str(root), "--cache-dir", str(tmp_path / "empty")]) == 1
    assert "4 problem(s)" in capsys.readouterr().out
    assert main(["verify", str(tiny_model_dir)]) == 0  # 1.x still goes through the 1.x check
    junk = write_files(tmp_path / "junk", {"readme.txt": b"x"})
    assert main(["verify", str(junk)]) == 2
    assert "not an IndexTTS model directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# download: main repo + missing dependencies, against a fake hub on 127.0.0.1


class FakeHub:
    """Several repos behind huggingface_hub's model-info and resolve endpoints (HEAD and GET)."""

    def __init__(self, repos: dict[str, Files], commits: dict[str, str] | None = None):
        self.repos = repos
        self.commits = {r: (commits or {}).get(r, hashlib.sha1(r.encode()).hexdigest()) for r in repos}
        self.gets: list[tuple[str, str]] = []
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
                if with_body:
                    self.wfile.write(body)

            def _route(self, with_body: bool) -> None:
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, with_body)
                        return
                    info = {"id": repo, "modelId": repo, "sha": hub.commits[repo], "private": False,
                            "siblings": [{"rfilename": n} for n in hub.repos[repo]]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, with_body)
                    return
                repo = "/".join(parts[:2])
                if repo not in hub.repos or len(parts) < 5 or parts[2] != "resolve":
                    self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, with_body)
                    return
                name = "/".join(parts[4:])
                data = hub.repos[repo].get(name)
                commit = hub.commits[repo]
                if data is None:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, with_body)
                    return
                lfs = not name.endswith((".json", ".yaml"))
                etag = _blob_name(data, lfs)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
                if lfs:
                    headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
                if with_body:
                    hub.gets.append((repo, name))
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

    def fetched(self, repo: str) -> list[str]:
        return sorted(n for r, n in self.gets if r == repo)


def _release_repos(bpe: bytes, dep_files: dict) -> dict[str, Files]:
    main = main_files(bpe)
    qwen = {f"qwen0.6bemo4-merge/{n}": json.dumps({"file": n}).encode()  # distinct: the hub dedupes blobs
            for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    qwen["qwen0.6bemo4-merge/model.safetensors"] = safetensors_bytes({"w": _t(2)})
    main |= qwen | {"README.md": b"# IndexTTS-2", "examples/voice.wav": b"RIFF"}
    repos = {"IndexTeam/IndexTTS-2": main}
    for dep in DEPENDENCIES:
        repos[dep.repo_id] = {f.repo_path: dep_files[dep.key][f.role] for f in dep.files} | {"README.md": b"#"}
    return repos


def test_download_hub_layout_then_offline(tmp_path: Path, bpe_model: bytes, dep_files: dict,
                                          hub_env: pytest.MonkeyPatch) -> None:
    from engine_ref.download import download_release

    cache = tmp_path / "hub"
    write_hub(cache, dep_files, ("campplus",))  # already installed: must not be fetched again
    with FakeHub(_release_repos(bpe_model, dep_files)) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        result = download_release("IndexTeam/IndexTTS-2", cache_dir=cache, timeout_s=5, progress=False)
    main_commit = hub.commits["IndexTeam/IndexTTS-2"]
    assert result.family == "indextts2" and result.layout == "hub"
    assert result.model_dir == cache / "models--IndexTeam--IndexTTS-2" / "snapshots" / main_commit
    assert result.fetched_dependencies == ("facebook/w2v-bert-2.0", "amphion/MaskGCT",
                                           "nvidia/bigvgan_v2_22khz_80band_256x")
    got_main = hub.fetched("IndexTeam/IndexTTS-2")
    assert "README.md" not in got_main and "examples/voice.wav" not in got_main
    qwen = [f"qwen0.6bemo4-merge/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json")]
    assert got_main == sorted([*main_files(bpe_model), *qwen]), got_main
    assert hub.fetched("funasr/campplus") == []
    assert hub.fetched("amphion/MaskGCT") == ["semantic_codec/model.safetensors"]
    with no_network(hub_env) as attempts:
        hub_env.delenv("HF_ENDPOINT")
        from engine_ref.hub_cache import resolve_model

        snap = resolve_model("IndexTeam/IndexTTS-2", cache_dir=cache)
        deps = resolve_dependencies(snap, cache_dir=cache)
        report = check_install(snap)  # no --cache-dir: the cache holding the snapshot is searched
    assert attempts == []
    assert snap == result.model_dir and {d.layout for d in deps.deps.values()} == {"hub"}
    assert report.ok, report.problems
    assert (cache / "models--amphion--MaskGCT" / "refs" / "main").read_text() == hub.commits["amphion/MaskGCT"]


def test_download_flat_layout(tmp_path: Path, bpe_model: bytes, dep_files: dict, hub_env: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    from triton_tts.cli import main

    target = tmp_path / "IndexTTS-2"
    with FakeHub(_release_repos(bpe_model, dep_files)) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        code = main(["download", "IndexTeam/IndexTTS-2", "--layout", "flat", "--local-dir", str(target),
                     "--skip-text-emotion", "--timeout", "5", "--cache-dir", str(tmp_path / "unused-cache")])
        assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"downloaded and verified: {target}" in out and "dependencies fetched (flat layout)" in out
    assert not any(n.startswith("qwen") for n in hub.fetched("IndexTeam/IndexTTS-2"))
    assert (target / "hf_cache" / "semantic_codec_model.safetensors").is_file()
    assert (target / "hf_cache" / "bigvgan" / "bigvgan_generator.pt").is_file()
    assert not (target / "hf_cache" / ".download").exists()  # staging cleaned up
    assert not (tmp_path / "unused-cache").exists()
    with no_network(hub_env) as attempts:
        deps = resolve_dependencies(target)
    assert attempts == [] and {d.layout for d in deps.deps.values()} == {"flat"}
    report = check_install(target)
    assert report.ok and row(report, "main", "qwen_emotion").status == "optional-absent"


def test_download_failures_name_the_repo(tmp_path: Path, bpe_model: bytes, dep_files: dict,
                                         hub_env: pytest.MonkeyPatch) -> None:
    from engine_ref.download import download_release

    repos = _release_repos(bpe_model, dep_files)
    del repos["funasr/campplus"]
    with FakeHub(repos) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFilesError, match="repo funasr/campplus does not exist"):
            download_release("IndexTeam/IndexTTS-2", cache_dir=tmp_path / "hub", timeout_s=5, progress=False)
    repos = _release_repos(bpe_model, dep_files)
    repos["IndexTeam/IndexTTS-2"]["s2mel.pth"] = repos["IndexTeam/IndexTTS-2"]["s2mel.pth"][:-30]
    with FakeHub(repos) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFilesError, match=r"s2mel\.pth is truncated"):
            download_release("IndexTeam/IndexTTS-2", cache_dir=tmp_path / "hub2", timeout_s=5, progress=False)
    with pytest.raises(InputError, match="--layout flat needs --local-dir"):
        download_release("IndexTeam/IndexTTS-2", layout="flat")
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE is set"):
        download_release("IndexTeam/IndexTTS-2", cache_dir=tmp_path / "hub3")


def test_download_2_5_uses_its_bundled_hf_cache(tmp_path: Path, bpe_model: bytes, dep_files: dict,
                                                hub_env: pytest.MonkeyPatch) -> None:
    from engine_ref.download import download_release

    bundled = {f"hf_cache/{f.flat_path}": dep_files[d.key][f.role] for d in DEPENDENCIES if d.key in V25_KEYS
               for f in d.files}
    repos = {"IndexTeam/IndexTTS-2.5": main_files(bpe_model, "indextts2.5") | bundled}  # no dependency repos
    with FakeHub(repos) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        result = download_release("IndexTeam/IndexTTS-2.5", layout="flat", local_dir=tmp_path / "v25", timeout_s=5,
                                  progress=False)
    assert (result.family, result.fetched_dependencies) == ("indextts2.5", ())
    assert sorted(n for n in hub.fetched("IndexTeam/IndexTTS-2.5") if n.startswith("hf_cache/")) == sorted(bundled)
    deps = resolve_dependencies(tmp_path / "v25")
    assert set(deps.deps) == set(V25_KEYS) and {d.layout for d in deps.deps.values()} == {"flat"}


def test_download_release_1x_unchanged(tmp_path: Path, tiny_model_dir: Path, hub_env: pytest.MonkeyPatch) -> None:
    from engine_ref.download import download_release

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    with FakeHub({"acme/tiny-1.5": files | {"dvae.pth": b"unused"}}) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        result = download_release("acme/tiny-1.5", cache_dir=tmp_path / "hub", timeout_s=5, progress=False)
        with pytest.raises(InputError, match="1.x repo; --layout flat"):
            download_release("acme/tiny-1.5", layout="flat", local_dir=tmp_path / "flat", timeout_s=5)
    assert result.family == "indextts" and result.fetched_dependencies == ()
    assert "dvae.pth" not in hub.fetched("acme/tiny-1.5")
    assert check_install(result.model_dir).ok
