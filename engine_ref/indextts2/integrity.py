"""Check an IndexTTS2 install (main directory and every hub dependency) in seconds, naming each problem and fix.

One report covers the main directory (config.yaml, gpt.pth, s2mel.pth, the tokenizer, wav2vec2bert_stats.pt,
feat1.pt, feat2.pt, the optional qwen0.6bemo4-merge/) and each dependency in whichever layout it was found
(`engine_ref.indextts2.hub`); rows carry a section so the table shows which part a file belongs to.

Shallow checks read headers only: torch.save zips are walked and unpickled memory-mapped (tensor data stays on
disk, so the shapes come for free), safetensors headers are parsed after comparing their length field with the
file size (a cut-off download is "truncated" without reading GBs), JSON/YAML/SentencePiece/tiktoken files are
parsed. A few tensor shapes per file are compared with what config.yaml (and the dependencies' config.json)
imply, so a file of another release or a tiny preset mixed into a full one is named. Full key sets are the
loaders' job (they load strictly). Official byte counts are compared too, but only reported unless
``expect_official=True`` (random-weight presets have other sizes). ``deep=True`` adds the 1.x byte-level checks:
hub blobs hashed against their names, zip CRCs of torch files.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from engine_ref.errors import ModelFilesError
from engine_ref.families import FAMILY_NAMES, INDEXTTS2_5, config_version, detect_family
from engine_ref.hub_cache import repo_of_cache_path
from engine_ref.indextts2.hub import (
    FLAT_DIR,
    MAIN_REPOS,
    QWEN_FILES,
    V2_FAMILIES,
    Candidate,
    Dependency,
    DependencyFile,
    MainFile,
    candidates,
    choose,
    dependencies_for,
    dependency_caches,
    describe_miss,
    main_files,
)
from engine_ref.integrity import (
    FileCheck,
    IntegrityReport,
    Shapes,
    Verdict,
    check_json,
    check_safetensors,
    check_sentencepiece,
    check_torch_file,
    content_row,
    deep_row,
    human_size,
    partial_downloads,
    presence_row,
)

MAIN_SECTION = "main"
Expected = Mapping[str, tuple[int | None, ...]]  # key -> shape; None = dimension not known from the config


# --- fixes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fix:
    """Fix wording for one install: fetch again with the download command (or copy), deleting a bad file first."""

    command: str  # `triton-tts download ...`
    copy_to: str = ""  # where a manual copy goes, when that is an option worth naming

    def refetch(self, name: str) -> str:
        return f"run {self.command} (it fetches missing files; delete a damaged file first){self.copy_to}"


def _main_fix(family: str, root: Path) -> _Fix:
    repo = repo_of_cache_path(root.absolute())
    if repo:
        return _Fix(f"`triton-tts download {repo}` again")
    official = MAIN_REPOS[family]
    return _Fix(f"`triton-tts download {official} --layout flat --local-dir DIR`",
                f", or copy the file again from the official release {official}")


def _dep_fix(family: str, root: Path, dep: Dependency, cand: Candidate | None) -> _Fix:
    repo = repo_of_cache_path(root.absolute()) or MAIN_REPOS[family]
    if cand is not None and cand.layout == "flat":
        return _Fix(f"`triton-tts download {repo} --layout flat --local-dir {root}`",
                    f", or copy {dep.repo_id}'s files into {root / FLAT_DIR}")
    return _Fix(f"`triton-tts download {repo}`", f", or copy {dep.repo_id}'s files into {root / FLAT_DIR}")


# --- numbers from the configs -----------------------------------------------------------------------------------


def _get(data: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _int(data: Mapping[str, Any] | None, dotted: str) -> int | None:
    v = _get(data, dotted)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class _Dims:
    """The widths config.yaml implies for the shapes checked here; None where the key is absent."""

    model_dim: int | None
    text_tokens: int | None
    mel_codes: int | None
    style: int | None
    dit_hidden: int | None
    mels: int | None
    style_condition: bool
    wavenet_hidden: int | None
    regulator_channels: int | None
    regulator_in: int | None
    sample_rate: int | None
    codebook: int | None
    codebook_dim: int | None
    codec_hidden: int | None
    vocos_dim: int | None
    emo_rows: int | None

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> _Dims:
        emo_num = _get(data, "emo_num")
        rows = sum(emo_num) if isinstance(emo_num, list) and all(isinstance(n, int) for n in emo_num) else None
        spect = "s2mel.preprocess_params"
        return cls(
            _int(data, "gpt.model_dim"), _int(data, "gpt.number_text_tokens"), _int(data, "gpt.number_mel_codes"),
            _int(data, "s2mel.style_encoder.dim"), _int(data, "s2mel.DiT.hidden_dim"),
            _int(data, "s2mel.DiT.in_channels"),
            _get(data, "s2mel.DiT.style_condition") is not False, _int(data, "s2mel.wavenet.hidden_dim"),
            _int(data, "s2mel.length_regulator.channels"), _int(data, "s2mel.length_regulator.in_channels"),
            _int(data, f"{spect}.sr"), _int(data, "semantic_codec.codebook_size"),
            _int(data, "semantic_codec.codebook_dim"), _int(data, "semantic_codec.hidden_size"),
            _int(data, "semantic_codec.vocos_dim"), rows,
        )


def _add(a: int | None, *rest: int | None) -> int | None:
    return None if a is None or any(r is None for r in rest) else a + sum(rest)  # type: ignore[arg-type]


def shape_problem(shapes: Shapes, expected: Expected, source: str) -> str | None:
    """First mismatch between stored shapes and expected ones (unknown dims skipped), or None."""
    for key, want in expected.items():
        if key not in shapes:
            return f"has no '{key}'{source}"
        got = tuple(shapes[key])
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
            return f"'{key}' is {list(got)}, expected {shown}{source}"
    return None


def _tensor_shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    return {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_ddp(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}


def _judged(problem: str | None, ok_detail: str, fix: str | None = None) -> Verdict:
    return ("wrong-shape", problem, fix) if problem else ("ok", ok_detail, None)


# --- main directory checks --------------------------------------------------------------------------------------


def _gpt_inspect(dims: _Dims, family: str) -> Callable[[Any], Verdict]:
    d = dims.model_dim
    expected: dict[str, tuple[int | None, ...]] = {
        "text_embedding.weight": (_add(dims.text_tokens, 1), d),
        "mel_embedding.weight": (dims.mel_codes, d),
        "gpt.h.0.attn.c_attn.weight": (d, None if d is None else 3 * d),
        "emo_layer.weight": (d, d),
    }
    if family == INDEXTTS2_5:
        expected["spk_emb_proj.weight"] = (d, dims.style)
    else:
        expected["speed_emb.weight"] = (2, d)
    other = "IndexTTS-2" if family == INDEXTTS2_5 else "IndexTTS-2.5"

    def inspect(obj: Any) -> Verdict:
        state = obj["model"] if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
        if not isinstance(state, Mapping):
            return "corrupt", f"holds a {type(state).__name__}, not a state dict", None
        shapes = _tensor_shapes(state)
        if not shapes:
            return "corrupt", "the state dict holds no tensors", None
        problem = shape_problem(shapes, expected, " (gpt.model_dim / number_text_tokens / number_mel_codes)")
        marker = "speed_emb.weight" if family == INDEXTTS2_5 else "spk_emb_proj.weight"
        if problem and marker in shapes:
            problem += f"; it has '{marker}': this looks like an {other} gpt.pth"
        return _judged(problem, f"{len(shapes)} tensors",
                       f"use the gpt.pth released with this config.yaml ({FAMILY_NAMES[family]})" if problem else None)

    return inspect


def _s2mel_inspect(dims: _Dims, family: str) -> Callable[[Any], Verdict]:
    h, m = dims.dit_hidden, dims.mels
    style = dims.style if dims.style_condition else 0
    expected = {
        "cfm": {
            "estimator.cond_x_merge_linear.weight": (h, _add(h, m, m, style)),
            "estimator.conv2.weight": (m, dims.wavenet_hidden, 1),
        },
        "length_regulator": {"content_in_proj.weight": (dims.regulator_channels, dims.regulator_in)},
    }
    if family != INDEXTTS2_5:  # 2.5 drops the GPT-latent projection; whether its file keeps one is not known
        expected["gpt_layer"] = {"0.weight": (256, dims.model_dim)}

    def inspect(obj: Any) -> Verdict:
        net = obj.get("net") if isinstance(obj, Mapping) else None
        if not isinstance(net, Mapping):
            keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
            return "corrupt", f"no 'net' entry (found: {keys}): not an s2mel training checkpoint", None
        missing = [name for name in expected if not isinstance(net.get(name), Mapping)]
        if missing:
            return ("wrong-shape", f"net lacks {', '.join(missing)} (has {', '.join(map(str, net))})",
                    "use the official s2mel.pth of this release")
        count = 0
        for name, want in expected.items():
            shapes = _strip_ddp(_tensor_shapes(net[name]))
            count += len(shapes)
            problem = shape_problem(shapes, want, f" in net['{name}'] (config.yaml s2mel / gpt)")
            if problem:
                return "wrong-shape", problem, "use the s2mel.pth released with this config.yaml"
        return "ok", f"net: {', '.join(map(str, net))} ({count} tensors)", None

    return inspect


def _codec_inspect(obj: Any) -> Verdict:
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping):
        return "corrupt", f"holds a {type(state).__name__}, not a state dict", None
    shapes = _tensor_shapes(state)
    if not shapes:
        return "corrupt", "no tensors under 'model'", None
    return "ok", f"{len(shapes)} tensors (layout not checked here)", None


def _stats_inspect(hidden: int | None) -> Callable[[Any], Verdict]:
    def inspect(obj: Any) -> Verdict:
        import torch

        if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "var")):
            found = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
            return "corrupt", f"expected {{'mean', 'var'}} tensors, found {found}", None
        problem = shape_problem(_tensor_shapes(obj), {"mean": (hidden,), "var": (hidden,)},
                                " (w2v-BERT hidden_size)")
        if problem is None and obj["mean"].shape != obj["var"].shape:
            problem = f"'mean' is {list(obj['mean'].shape)} but 'var' is {list(obj['var'].shape)}"
        return _judged(problem, f"mean/var {list(obj['mean'].shape)}",
                       "use the wav2vec2bert_stats.pt of this release (it matches w2v-bert-2.0)" if problem else None)

    return inspect


def _matrix_inspect(rows: int | None, cols: int | None, what: str) -> Callable[[Any], Verdict]:
    def inspect(obj: Any) -> Verdict:
        import torch

        if not isinstance(obj, torch.Tensor):
            return "corrupt", f"holds a {type(obj).__name__}, expected one tensor", None
        problem = shape_problem({"matrix": tuple(obj.shape)}, {"matrix": (rows, cols)}, f" ({what})")
        return _judged(problem, f"{list(obj.shape)}", "use feat1.pt/feat2.pt of this release" if problem else None)

    return inspect


def check_tiktoken(path: Path, max_rank: int | None) -> Verdict:
    """A tiktoken vocabulary: one ``<base64 token> <rank>`` per line, ranks distinct and below the GPT's vocab."""
    ranks: set[int] = set()
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (ValueError, binascii.Error):
                return "corrupt", f"line {number} is not '<base64 token> <rank>'", None
            ranks.add(rank)
    if not ranks:
        return "corrupt", "no tokens", None
    if max_rank is not None and max(ranks) >= max_rank:
        return ("wrong-shape", f"rank {max(ranks)} does not fit gpt.number_text_tokens {max_rank}",
                "use the tokenizer shipped with this gpt.pth and config.yaml")
    return "ok", f"{len(ranks)} tokens", None


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _size_note(row: FileCheck, official: int | None, expect_official: bool) -> FileCheck:
    """Compare with the official byte count: reported in the detail, a problem only when asked for."""
    if official is None or row.size is None or row.size == official:
        return row
    note = f"{human_size(row.size)} on disk, the official file has {official:,} B"
    if row.ok and expect_official:
        return replace(row, status="wrong-size", detail=f"{note}: not the official file",
                       fix="use the official file (or drop expect_official for presets and fine-tunes)")
    return replace(row, detail=f"{row.detail}; {note}" if row.detail else note)


def _file_rows(
    role: str, name: str, path: Path, check: Callable[[], Verdict], fix: _Fix, partials: list[Path], *,
    section: str, size: int | None, deep: bool, expect_official: bool, note: str = "",
) -> FileCheck:
    row = presence_row(role, name, path, fix, partials)
    if row is None:
        row = content_row(role, name, path, check, fix, section)
        if deep and row.ok:
            row = deep_row(row, path, fix, zip_crc=_is_zip(path) and name.endswith((".pth", ".pt", ".bin")))
    row = replace(row, section=section)
    if note:
        row = replace(row, detail=f"{row.detail}; {note}" if row.detail else note)
    return _size_note(row, size, expect_official)


def _config_row(root: Path, family: str, fix: _Fix, partials: list[Path], deep: bool) -> tuple[FileCheck, dict | None]:
    path = root / "config.yaml"
    row = presence_row("config", "config.yaml", path, fix, partials)
    if row is not None:
        return replace(row, section=MAIN_SECTION), None
    data: dict | None = None

    def check() -> Verdict:
        nonlocal data
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            return "corrupt", f"not valid YAML ({type(exc).__name__})", None
        if not isinstance(loaded, dict):
            return "corrupt", "not a YAML mapping", None
        missing = [s for s in ("gpt", "s2mel") if not isinstance(loaded.get(s), dict)]
        if missing:
            return ("corrupt", f"no {' / '.join(missing)} section: not an IndexTTS2 config.yaml",
                    "use the config.yaml shipped with the checkpoints")
        data = loaded
        version = config_version(loaded)
        detail = f"{FAMILY_NAMES[family]} (version {version or 'not given'})"
        if family == INDEXTTS2_5 and version == "2.0":
            detail += "; version says 2.0 but codec.pth / the .tiktoken vocabulary are IndexTTS-2.5's"
        return "ok", detail, None

    row = content_row("config", "config.yaml", path, check, fix, MAIN_SECTION)
    if deep and row.ok:
        row = deep_row(row, path, fix, zip_crc=False)
    return row, data


def _qwen_rows(root: Path, mf: MainFile, fix: _Fix, partials: list[Path], deep: bool,
               expect_official: bool) -> list[FileCheck]:
    folder = root / mf.name
    if not os.path.lexists(folder):
        return [FileCheck("qwen_emotion", mf.name + "/", str(folder), "optional-absent", None,
                          "optional, absent: only needed for emotion from text (QwenEmotion)", "", MAIN_SECTION)]
    if not folder.is_dir():
        return [FileCheck("qwen_emotion", mf.name + "/", str(folder), "corrupt", None,
                          "not a directory (a dangling link?)",
                          f"copy the whole {mf.name}/ folder again, or remove it to run without text emotion",
                          MAIN_SECTION)]
    qfix = _Fix(fix.command, f", or remove {mf.name}/ to run without emotion from text")
    rows = []
    for fname, kind, size in QWEN_FILES:
        path = folder / fname
        check: Callable[[], Verdict] = (
            (lambda p=path: check_safetensors(p)) if kind == "safetensors" else (lambda p=path: check_json(p))
        )
        rows.append(_file_rows("qwen_emotion", f"{mf.name}/{fname}", path, check, qfix, partials,
                               section=MAIN_SECTION, size=size, deep=deep, expect_official=expect_official))
    return rows


# --- dependency checks ------------------------------------------------------------------------------------------


def _w2v_config_inspect(data: Mapping[str, Any]) -> Verdict:
    if data.get("model_type") != "wav2vec2-bert":
        return "corrupt", f"model_type is {data.get('model_type')!r}, expected 'wav2vec2-bert'", None
    return "ok", f"hidden {data.get('hidden_size')}, {data.get('num_hidden_layers')} layers", None


def _w2v_weights_inspect(cfg: Mapping[str, Any] | None) -> Callable[[Shapes], Verdict]:
    hidden = _int(cfg, "hidden_size")
    proj_in = _int(cfg, "feature_projection_input_dim")
    inter = _int(cfg, "intermediate_size")

    def inspect(shapes: Shapes) -> Verdict:
        expected = {
            "feature_projection.projection.weight": (hidden, proj_in),
            "encoder.layers.0.ffn1.intermediate_dense.weight": (inter, hidden),
        }
        problem = shape_problem(shapes, expected, " (config.json)")
        layers = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers.") and k.split(".")[2].isdigit()}
        if problem is None and len(layers) < 17:
            problem = f"only {len(layers)} encoder layers; IndexTTS2 reads the output of layer 17"
        return _judged(problem, f"{len(shapes)} tensors, {len(layers)} layers",
                       "use facebook/w2v-bert-2.0's model.safetensors with its config.json" if problem else None)

    return inspect


def _codec_weights_inspect(dims: _Dims) -> Callable[[Shapes], Verdict]:
    def inspect(shapes: Shapes) -> Verdict:
        expected = {
            "quantizer.quantizers.0.codebook.weight": (dims.codebook, dims.codebook_dim),
            "encoder.0.embed.weight": (dims.vocos_dim, dims.codec_hidden, 7),
        }
        problem = shape_problem(shapes, expected, " (config.yaml semantic_codec)")
        return _judged(problem, f"{len(shapes)} tensors",
                       "use amphion/MaskGCT semantic_codec/model.safetensors" if problem else None)

    return inspect


def _campplus_inspect(dims: _Dims) -> Callable[[Any], Verdict]:
    def inspect(obj: Any) -> Verdict:
        if not isinstance(obj, Mapping):
            return "corrupt", f"holds a {type(obj).__name__}, not a state dict", None
        shapes = _tensor_shapes(obj)
        if not shapes:
            return "corrupt", "the state dict holds no tensors", None
        expected = {"head.conv1.weight": (32, 1, 3, 3), "xvector.dense.linear.weight": (dims.style, None, 1)}
        problem = shape_problem(shapes, expected, " (CAMPPlus(80, 192); config.yaml s2mel.style_encoder.dim)")
        return _judged(problem, f"{len(shapes)} tensors",
                       "use funasr/campplus campplus_cn_common.bin" if problem else None)

    return inspect


def _bigvgan_config_inspect(dims: _Dims) -> Callable[[Mapping[str, Any]], Verdict]:
    def inspect(data: Mapping[str, Any]) -> Verdict:
        for key, want, where in (("num_mels", dims.mels, "s2mel.DiT.in_channels"),
                                 ("sampling_rate", dims.sample_rate, "s2mel.preprocess_params.sr")):
            if want is not None and data.get(key) != want:
                return ("wrong-shape", f"{key} is {data.get(key)!r} but config.yaml {where} is {want}: another vocoder",
                        "use nvidia/bigvgan_v2_22khz_80band_256x (22.05 kHz, 80 bands)")
        return "ok", f"{data.get('sampling_rate')} Hz, {data.get('num_mels')} mels", None

    return inspect


def _bigvgan_weights_inspect(cfg: Mapping[str, Any] | None) -> Callable[[Any], Verdict]:
    def inspect(obj: Any) -> Verdict:
        if not isinstance(obj, Mapping):
            return "corrupt", f"holds a {type(obj).__name__}, not a dict", None
        state = obj.get("generator", obj)
        shapes = _tensor_shapes(state) if isinstance(state, Mapping) else {}
        if not shapes:
            keys = ", ".join(map(str, list(obj)[:5]))
            return ("corrupt", f"no 'generator' state dict (found: {keys})",
                    "use bigvgan_generator.pt of nvidia/bigvgan_v2_22khz_80band_256x (not a discriminator)")
        key = "conv_pre.weight_v" if "conv_pre.weight_v" in shapes else "conv_pre.weight"
        want = (_int(cfg, "upsample_initial_channel"), _int(cfg, "num_mels"), 7)
        problem = shape_problem(shapes, {key: want}, " (config.json)")
        return _judged(problem, f"{len(shapes)} tensors",
                       "use the bigvgan_generator.pt released with this config.json" if problem else None)

    return inspect


def _soft_json(path: Path | None) -> dict | None:
    """A JSON object when the file reads cleanly, else None (its own row reports why)."""
    import json

    try:
        data = json.loads(path.read_bytes()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dep_checker(dep: Dependency, f: DependencyFile, path: Path, dims: _Dims,
                 sibling: Callable[[str], Path | None]) -> Callable[[], Verdict]:
    if dep.key == "w2v_bert":
        if f.role == "config":
            return lambda: check_json(path, _w2v_config_inspect)
        if f.role == "weights":
            return lambda: check_safetensors(path, _w2v_weights_inspect(_soft_json(sibling("config"))))
        return lambda: check_json(path)
    if dep.key == "semantic_codec":
        return lambda: check_safetensors(path, _codec_weights_inspect(dims))
    if dep.key == "campplus":
        return lambda: check_torch_file(path, _campplus_inspect(dims), allow_legacy=True)
    if f.role == "config":
        return lambda: check_json(path, _bigvgan_config_inspect(dims))
    return lambda: check_torch_file(path, _bigvgan_weights_inspect(_soft_json(sibling("config"))))


def _dependency_rows(dep: Dependency, root: Path, family: str, found: tuple[Candidate, ...], dims: _Dims,
                     deep: bool, expect_official: bool) -> list[FileCheck]:
    chosen = choose(found)
    fix = _dep_fix(family, root, dep, chosen)
    if chosen is None:
        flat = root / FLAT_DIR
        return [FileCheck("all", dep.repo_id, str(flat), "missing", None, describe_miss(dep, None, found),
                          fix.refetch(dep.repo_id), f"{dep.repo_id} (not found)")]
    section = f"{dep.repo_id} ({chosen.layout})"
    lookup = chosen.lookup
    if lookup is not None and lookup.snapshot is None:
        status = "missing" if lookup.problem == "missing-snapshot" else "missing-ref"
        detail = describe_miss(dep, chosen, found)
        if lookup.problem == "no-ref" and len(lookup.snapshots) == 1:
            how = (f"write the snapshot's commit into it: printf %s {lookup.snapshots[0]} > {lookup.ref_file}"
                   f" (or run {fix.command})")
        else:
            how = fix.refetch("refs/main")
        return [FileCheck("refs", f"refs/{lookup.revision}", str(lookup.ref_file), status, None, detail, how, section)]
    # interrupted downloads: the flat download's staging folder, or the snapshot's blobs/ folder
    folder = chosen.staging if chosen.staging is not None else lookup.snapshot  # type: ignore[union-attr]
    partials = partial_downloads(folder)  # type: ignore[arg-type]
    rows = []
    for f in dep.files:
        path = chosen.paths[f.role]
        shown = f.flat_path if chosen.layout == "flat" else f.repo_path
        check = _dep_checker(dep, f, path, dims, lambda role: chosen.paths.get(role))
        rows.append(_file_rows(f.role, shown, path, check, fix, partials, section=section, size=f.size,
                               deep=deep, expect_official=expect_official))
    if chosen.layout == "hub" and dep.pinned_prefix and lookup is not None and lookup.commit:
        if not lookup.commit.startswith(dep.pinned_prefix):
            first = rows[0]
            note = f"snapshot {lookup.commit[:12]}; installers pin {dep.pinned_prefix}… (unverified)"
            rows[0] = replace(first, detail=f"{first.detail}; {note}")
    return rows


# --- the whole install ------------------------------------------------------------------------------------------


def check_indextts2_dir(
    model_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, deep: bool = False,
    family: str | None = None, expect_official: bool = False,
) -> IntegrityReport:
    """Every file an IndexTTS-2 / IndexTTS-2.5 install needs, main directory first, then each dependency.

    A missing directory raises `ModelFilesError`; everything else is a row. `cache_dir` is the Hugging Face
    cache to search for dependencies (default: HF_HUB_CACHE / HF_HOME); filesystem only, no network.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ModelFilesError(f"model directory {root} {what}",
                              "pass the IndexTTS2 directory that holds config.yaml, gpt.pth and s2mel.pth")
    family = family or detect_family(root)
    if family not in V2_FAMILIES:
        raise ModelFilesError(f"{root} is not an IndexTTS2 directory ({FAMILY_NAMES.get(family, family)})",
                              "check it with engine_ref.integrity.check_model_dir (or `triton-tts verify`)")
    fix = _main_fix(family, root)
    partials = partial_downloads(root)
    config_row, data = _config_row(root, family, fix, partials, deep)
    dims = _Dims.from_config(data)

    caches = dependency_caches(root, cache_dir)
    found = {dep.key: candidates(dep, root, caches) for dep in dependencies_for(family)}
    w2v = choose(found["w2v_bert"])
    w2v_hidden = _int(_soft_json(w2v.paths.get("config")) if w2v else None, "hidden_size")

    checks: dict[str, Callable[[Path], Callable[[], Verdict]]] = {
        "gpt": lambda p: lambda: check_torch_file(p, _gpt_inspect(dims, family)),
        "s2mel": lambda p: lambda: check_torch_file(p, _s2mel_inspect(dims, family)),
        "bpe": lambda p: lambda: check_sentencepiece(p, dims.text_tokens),
        "tokenizer": lambda p: lambda: check_tiktoken(p, dims.text_tokens),
        "codec": lambda p: lambda: check_torch_file(p, _codec_inspect),
        "w2v_stats": lambda p: lambda: check_torch_file(p, _stats_inspect(w2v_hidden)),
        "spk_matrix": lambda p: lambda: check_torch_file(
            p, _matrix_inspect(dims.emo_rows, dims.style, "sum(emo_num) x s2mel.style_encoder.dim")),
        "emo_matrix": lambda p: lambda: check_torch_file(
            p, _matrix_inspect(dims.emo_rows, dims.model_dim, "sum(emo_num) x gpt.model_dim")),
    }
    rows = [_size_note(config_row, 2_882 if family != INDEXTTS2_5 else None, expect_official)]
    for mf in main_files(data or {}, family)[1:]:
        if mf.kind == "dir":
            rows += _qwen_rows(root, mf, fix, partials, deep, expect_official)
            continue
        path = root / mf.name
        rows.append(_file_rows(mf.role, mf.name, path, checks[mf.role](path), fix, partials, section=MAIN_SECTION,
                               size=mf.size, deep=deep, expect_official=expect_official, note=mf.note))
    for dep in dependencies_for(family):
        rows += _dependency_rows(dep, root, family, found[dep.key], dims, deep, expect_official)
    return IntegrityReport(str(root), tuple(rows), config_version(data) if data else None, family)
