"""IndexTTS2's semantic features: SeamlessM4T fbank -> w2v-BERT 2.0 layer 17 -> wav2vec2bert_stats normalisation.

Upstream (infer_v2 ``get_emb``) runs the FULL 24-layer ``Wav2Vec2BertModel`` with ``output_hidden_states=True``
and keeps ``hidden_states[17]`` (index 0 is the feature projection, so 17 = the output of the 17th conformer
layer), then ``(x - mean) / sqrt(var)`` with wav2vec2bert_stats.pt. Layers 18-24 only cost time: here the model
is BUILT with 17 layers and only their weights are read from model.safetensors (transformers' encoder applies no
norm after its last layer, so the 17-layer ``last_hidden_state`` IS the 24-layer ``hidden_states[17]``).

Both the feature extractor and the model come from transformers and are used unchanged; they load from a local
directory only (the w2v-bert-2.0 snapshot: config.json, preprocessor_config.json, model.safetensors), never from
the hub. The weights are read with `safetensors` directly so loading is strict: a missing key, an unknown key
or a wrong shape is a CheckpointError naming it (``from_pretrained`` would warn and initialise randomly).
Attention runs in transformers' "eager" implementation, the code path of transformers 4.52.1 (upstream's pin).

Batches: the extractor normalises each clip on its own, pads to the longest (even) frame count with
padding_value 1 and returns a mask; the model zeroes masked frames, masks attention keys and the (causal)
depthwise conv input, so every row's first ``frame_counts[i]`` outputs equal the unbatched run of that clip.
``frame_counts`` counts stacked frames as upstream's B=1 run has them: ceil(fbank frames / 2), which includes
a last frame that the extractor's own mask marks invalid when the fbank frame count is odd (upstream keeps
that frame in spk_cond_emb, so we do too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine_ref.errors import CheckpointError, ConfigError, InputError, ModelFilesError
from engine_ref.indextts2.fbank import fbank_num_frames
from engine_ref.layout import TensorSpec, materialize_tensor

__all__ = [
    "W2V_LAYER", "SAMPLE_RATE", "HUB_CONFIG", "HUB_PREPROCESSOR_CONFIG", "W2VInputs", "SemanticFeatureEncoder",
    "SemanticFrontEnd", "load_feature_extractor", "extract_input_features", "load_w2v_bert", "load_w2v_stats",
    "stacked_frame_counts", "write_random_w2v_bert", "write_w2v_stats", "write_random_w2v_stats",
]

W2V_LAYER = 17  # hidden_states index upstream keeps
SAMPLE_RATE = 16000
_FBANK_WINDOW, _FBANK_SHIFT, _STRIDE = 400, 160, 2  # SeamlessM4T extractor: 25 ms / 10 ms frames, pairs stacked
_MIN_FBANK_FRAMES = 2  # the per-bin variance uses ddof=1: one frame would give NaN features

# facebook/w2v-bert-2.0 config.json (1,874 B written as below) and preprocessor_config.json (275 B). Rebuilt from
# the transformers config fields; the byte counts match the hub files' published sizes, which is the evidence
# that the field set and values are right (the files themselves were not available).
HUB_CONFIG: dict = {
    "activation_dropout": 0.0, "adapter_act": "relu", "adapter_kernel_size": 3, "adapter_stride": 2,
    "add_adapter": False, "apply_spec_augment": False, "architectures": ["Wav2Vec2BertModel"],
    "attention_dropout": 0.0, "bos_token_id": 1, "classifier_proj_size": 768, "codevector_dim": 768,
    "conformer_conv_dropout": 0.1, "contrastive_logits_temperature": 0.1, "conv_depthwise_kernel_size": 31,
    "ctc_loss_reduction": "sum", "ctc_zero_infinity": False, "diversity_loss_weight": 0.1, "eos_token_id": 2,
    "feat_proj_dropout": 0.0, "feat_quantizer_dropout": 0.0, "feature_projection_input_dim": 160,
    "final_dropout": 0.1, "hidden_act": "swish", "hidden_dropout": 0.0, "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "layerdrop": 0.1,
    "left_max_position_embeddings": 64, "mask_feature_length": 10, "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0, "mask_time_length": 10, "mask_time_min_masks": 2, "mask_time_prob": 0.05,
    "max_source_positions": 5000, "model_type": "wav2vec2-bert", "num_adapter_layers": 1,
    "num_attention_heads": 16, "num_codevector_groups": 2, "num_codevectors_per_group": 320,
    "num_hidden_layers": 24, "num_negatives": 100, "output_hidden_size": 1024, "pad_token_id": 0,
    "position_embeddings_type": "relative_key", "proj_codevector_dim": 768, "right_max_position_embeddings": 8,
    "rotary_embedding_base": 10000, "tdnn_dilation": [1, 2, 3, 1, 1], "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1], "torch_dtype": "float32", "transformers_version": "4.37.0.dev0",
    "use_intermediate_ffn_before_adapter": False, "use_weighted_layer_sum": False, "vocab_size": None,
    "xvector_output_dim": 512,
}
HUB_PREPROCESSOR_CONFIG: dict = {
    "feature_extractor_type": "SeamlessM4TFeatureExtractor", "feature_size": 80, "num_mel_bins": 80,
    "padding_side": "right", "padding_value": 1, "processor_class": "Wav2Vec2BertProcessor",
    "return_attention_mask": True, "sampling_rate": 16000, "stride": 2,
}
_MODEL_FILE, _CONFIG_FILE, _PREPROCESSOR_FILE = "model.safetensors", "config.json", "preprocessor_config.json"
_UNUSED_KEYS = ("masked_spec_embed",)  # SpecAugment vector: training only, tolerated present or absent
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")
_FIX_DIR = "point it at the facebook/w2v-bert-2.0 snapshot (config.json, preprocessor_config.json, model.safetensors)"


def _hub_json(mapping: Mapping) -> str:
    """transformers' own layout: sorted keys, indent 2, trailing newline."""
    return json.dumps(mapping, indent=2, sort_keys=True) + "\n"


def _require_dir(model_dir: str | Path, files: Sequence[str]) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFilesError(f"w2v-BERT directory {path} does not exist", _FIX_DIR)
    for name in files:
        if not (path / name).is_file():  # is_file follows HF-cache symlinks; a dangling one counts as missing
            raise ModelFilesError(f"w2v-BERT directory {path} has no {name}", _FIX_DIR)
    return path


# ---- feature extraction (transformers' SeamlessM4TFeatureExtractor) ----

@dataclass(frozen=True)
class W2VInputs:
    """Extractor output for a batch: features [B, T, 160] f32, mask [B, T] i64, frame_counts [B] i64."""

    input_features: torch.Tensor
    attention_mask: torch.Tensor
    frame_counts: torch.Tensor


def stacked_frame_counts(num_samples: Sequence[int]) -> torch.Tensor:
    """Stacked frames a clip of n samples gets when run alone: ceil(fbank_frames(n) / 2)."""
    fb = [fbank_num_frames(int(n), _FBANK_WINDOW, _FBANK_SHIFT) for n in num_samples]
    return torch.tensor([(f + _STRIDE - 1) // _STRIDE for f in fb], dtype=torch.long)


def load_feature_extractor(model_dir: str | Path):
    """SeamlessM4TFeatureExtractor from the snapshot's preprocessor_config.json (local files only)."""
    from transformers import SeamlessM4TFeatureExtractor

    path = _require_dir(model_dir, (_PREPROCESSOR_FILE,))
    return SeamlessM4TFeatureExtractor.from_pretrained(str(path), local_files_only=True)


def extract_input_features(extractor, waveforms: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
                           sample_rate: int = SAMPLE_RATE) -> W2VInputs:
    """16 kHz mono clips (each 1-D, values in [-1, 1]) -> padded extractor features, mask and frame counts.

    A single clip gives exactly upstream's ``extractor(audio_16k, sampling_rate=16000, return_tensors="pt")``.
    """
    if sample_rate != SAMPLE_RATE:
        raise InputError(f"w2v-BERT features need {SAMPLE_RATE} Hz audio, got {sample_rate} Hz",
                         "resample the reference to 16 kHz first")
    if isinstance(waveforms, torch.Tensor) and waveforms.dim() == 1:
        waveforms = [waveforms]
    clips = []
    for i, w in enumerate(waveforms):
        arr = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise InputError(f"clip {i} has shape {list(arr.shape)}, expected mono [samples]", "mix it down to mono")
        frames = fbank_num_frames(arr.shape[0], _FBANK_WINDOW, _FBANK_SHIFT)
        if frames < _MIN_FBANK_FRAMES:
            raise InputError(f"clip {i} has {arr.shape[0]} samples ({frames} fbank frames); w2v-BERT features "
                             f"need at least {_MIN_FBANK_FRAMES} frames ({_FBANK_WINDOW + _FBANK_SHIFT} samples)",
                             "use a longer reference clip")
        clips.append(arr)
    if not clips:
        raise InputError("no audio clips given", "pass at least one 16 kHz clip")
    out = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
    counts = stacked_frame_counts([c.shape[0] for c in clips])
    feats = out["input_features"].to(torch.float32)
    if int(counts.max()) != feats.shape[1]:
        raise ConfigError(f"the feature extractor gave {feats.shape[1]} frames where {int(counts.max())} were "
                          "expected; its preprocessor_config.json is not the w2v-bert-2.0 one (stride 2, 80 bins)",
                          _FIX_DIR)
    return W2VInputs(feats, out["attention_mask"].to(torch.long), counts)


# ---- the 17-layer model ----

def _truncated_config(path: Path, num_layers: int):
    from transformers import Wav2Vec2BertConfig

    try:
        config = Wav2Vec2BertConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # a corrupt / foreign config.json
        raise ModelFilesError(f"{path / _CONFIG_FILE} is not a readable Wav2Vec2Bert config ({exc})", _FIX_DIR) \
            from None
    if config.num_hidden_layers < num_layers:
        raise ConfigError(f"{path / _CONFIG_FILE} has num_hidden_layers={config.num_hidden_layers}; IndexTTS2 "
                          f"reads hidden layer {num_layers}", _FIX_DIR)
    if config.add_adapter or config.use_intermediate_ffn_before_adapter:
        raise ConfigError(f"{path / _CONFIG_FILE} enables an adapter; w2v-bert-2.0 has none", _FIX_DIR)
    full_layers = config.num_hidden_layers
    config.num_hidden_layers = num_layers
    config._attn_implementation = "eager"
    return config, full_layers


def _read_state(path: Path, expected: Mapping[str, torch.Size], full_layers: int, num_layers: int) -> dict:
    """The tensors `expected` names from model.safetensors (f32), after checking the file's whole key set."""
    from safetensors import safe_open

    file = path / _MODEL_FILE
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:
        raise ModelFilesError(f"{file} cannot be read as safetensors ({exc})", "re-download it") from None
    with handle as f:
        names = list(f.keys())
        prefix = "wav2vec2_bert."  # a checkpoint saved from a head model carries the base-model prefix
        strip = prefix if names and all(n.startswith(prefix) for n in names) else ""
        by_key = {n[len(strip):]: n for n in names}
        missing = [k for k in expected if k not in by_key and k not in _UNUSED_KEYS]
        unexpected = []
        for key in by_key:
            if key in expected or key in _UNUSED_KEYS:
                continue
            m = _LAYER_KEY.match(key)
            if m and num_layers <= int(m.group(1)) < full_layers:
                continue  # layers past 17 exist in the file and are deliberately not read
            unexpected.append(key)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {', '.join(sorted(missing)[:5])}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)}: {', '.join(sorted(unexpected)[:5])}")
            raise CheckpointError(f"{file} does not match its config.json ({'; '.join(parts)})",
                                  "use the model.safetensors of the same w2v-bert-2.0 snapshot as config.json")
        state = {}
        for key, shape in expected.items():
            if key not in by_key:
                continue
            found = tuple(f.get_slice(by_key[key]).get_shape())
            if found != tuple(shape):
                raise CheckpointError(f"{file}: '{key}' has shape {list(found)}, config.json implies {list(shape)}",
                                      "use the model.safetensors of the same w2v-bert-2.0 snapshot as config.json")
            tensor = f.get_tensor(by_key[key])
            state[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return state


def load_w2v_bert(model_dir: str | Path, num_layers: int = W2V_LAYER):
    """Wav2Vec2BertModel with only its first `num_layers` conformer layers, strictly loaded, eval mode, fp32."""
    from transformers import Wav2Vec2BertModel

    path = _require_dir(model_dir, (_CONFIG_FILE, _MODEL_FILE))
    config, full_layers = _truncated_config(path, num_layers)
    with torch.device("meta"):  # no random init of 400 M weights that are overwritten anyway
        model = Wav2Vec2BertModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = _read_state(path, expected, full_layers, num_layers)
    for key in _UNUSED_KEYS:
        if key in expected and key not in state:
            state[key] = torch.zeros(expected[key])
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer a future transformers might add: fail loudly rather than compute on meta
        raise CheckpointError(f"w2v-BERT tensors not restored after loading: {leftover[:5]}",
                              "report this: the transformers version builds buffers this loader does not know")
    return model.eval()


def load_w2v_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """wav2vec2bert_stats.pt -> (mean, std = sqrt(var)), both float32 [hidden]."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{path} does not exist", "copy wav2vec2bert_stats.pt from the IndexTTS-2 checkpoints")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFilesError(f"{path} cannot be read ({exc})", "re-download wav2vec2bert_stats.pt") from None
    if not isinstance(stats, Mapping) or not {"mean", "var"} <= set(stats):
        raise CheckpointError(f"{path} must hold a dict with 'mean' and 'var'", "use the official wav2vec2bert_stats.pt")
    mean, var = (torch.as_tensor(stats[k]).to(torch.float32).reshape(-1) for k in ("mean", "var"))
    if mean.shape != var.shape:
        raise CheckpointError(f"{path}: mean {list(mean.shape)} and var {list(var.shape)} differ in shape",
                              "use the official wav2vec2bert_stats.pt")
    return mean, torch.sqrt(var)


class SemanticFeatureEncoder(nn.Module):
    """(input_features [B, T, 160], attention_mask [B, T]) -> normalised layer-17 features [B, T, hidden].

    Outputs at padded positions are not zeroed: use the extractor's frame counts to slice rows.
    """

    def __init__(self, w2v_bert: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        hidden = w2v_bert.config.hidden_size
        if mean.shape != (hidden,) or std.shape != (hidden,):
            raise CheckpointError(f"wav2vec2bert_stats holds {list(mean.shape)}-d statistics for a {hidden}-d "
                                  "w2v-BERT", "use the stats file released with these checkpoints")
        self.w2v_bert = w2v_bert
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    @classmethod
    def from_files(cls, model_dir: str | Path, stats_path: str | Path) -> "SemanticFeatureEncoder":
        mean, std = load_w2v_stats(stats_path)
        return cls(load_w2v_bert(model_dir), mean, std).eval()

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.w2v_bert(input_features=input_features, attention_mask=attention_mask).last_hidden_state
        return (hidden - self.mean.to(hidden)) / self.std.to(hidden)


class SemanticFrontEnd:
    """Extractor + encoder together: 16 kHz clips -> (features [B, T, hidden], frame_counts [B])."""

    def __init__(self, model_dir: str | Path, stats_path: str | Path):
        self.extractor = load_feature_extractor(model_dir)
        self.encoder = SemanticFeatureEncoder.from_files(model_dir, stats_path)

    @torch.inference_mode()
    def __call__(self, waveforms) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = extract_input_features(self.extractor, waveforms)
        return self.encoder(inputs.input_features, inputs.attention_mask), inputs.frame_counts


# ---- random-weight snapshots for presets and tests ----

def _w2v_spec(key: str, shape: tuple[int, ...]) -> TensorSpec:
    """Init rules that keep a random model's outputs finite and non-degenerate (not trained values)."""
    if key.endswith("layer_norm.weight"):
        return TensorSpec(shape, init="normal", mean=1.0, std=0.05)
    if key.endswith(".bias"):
        return TensorSpec(shape, init="normal", std=0.02)
    if key == "masked_spec_embed":
        return TensorSpec(shape, init="uniform")
    return TensorSpec(shape)  # normal, std 1/sqrt(fan_in)


def write_random_w2v_bert(model_dir: str | Path, config_overrides: Mapping | None = None, seed: int = 0) -> Path:
    """A w2v-bert-2.0-shaped snapshot with deterministic random weights: config.json, preprocessor_config.json,
    model.safetensors (keys and shapes as transformers saves Wav2Vec2BertModel; per-key seeds).

    `config_overrides` replaces hub config fields (e.g. hidden_size=32, num_hidden_layers=18 for a tiny preset).
    """
    from safetensors.torch import save_file
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(HUB_CONFIG)
    cfg.update(config_overrides or {})
    (path / _CONFIG_FILE).write_text(_hub_json(cfg))
    (path / _PREPROCESSOR_FILE).write_text(_hub_json(HUB_PREPROCESSOR_CONFIG))
    config = Wav2Vec2BertConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Wav2Vec2BertModel(config).state_dict().items()}
    state = {k: materialize_tensor(k, _w2v_spec(k, s), seed).contiguous() for k, s in shapes.items()}
    save_file(state, str(path / _MODEL_FILE), metadata={"format": "pt"})
    return path


def write_w2v_stats(path: str | Path, mean: torch.Tensor, var: torch.Tensor) -> Path:
    """wav2vec2bert_stats.pt as upstream reads it: torch.save({'mean': [hidden], 'var': [hidden]})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean.to(torch.float32).contiguous(), "var": var.to(torch.float32).contiguous()}, path)
    return path


def write_random_w2v_stats(path: str | Path, hidden_size: int = 1024, seed: int = 0) -> Path:
    """Deterministic stand-in statistics: mean ~ N(0, 0.1), var in [0.5, 2)."""
    mean = materialize_tensor("mean", TensorSpec((hidden_size,), init="normal", std=0.1), seed)
    var = materialize_tensor("var", TensorSpec((hidden_size,), init="uniform", low=0.5, high=2.0), seed)
    return write_w2v_stats(path, mean, var)
