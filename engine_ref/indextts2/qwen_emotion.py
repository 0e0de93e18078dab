"""Text -> 8 emotion weights through IndexTTS2's fine-tuned Qwen3 (qwen0.6bemo4-merge/), as infer_v2's QwenEmotion.

The model directory is read with transformers' AutoTokenizer / AutoModelForCausalLM from the LOCAL directory only
(never the hub), lazily on the first request that asks for text emotion; a missing directory fails that request
with an InputError and nothing else. transformers is needed only for this mode.

Upstream's steps, reproduced: chat [system "文本情感分类", user <text>] with enable_thinking=False and the generation
prompt; generate(max_new_tokens=32768, pad = eos; sampling settings from the directory's generation_config.json);
keep the tokens after the LAST `</think>` (id 151668 in Qwen3's vocabulary); decode without special tokens; JSON,
else a regex over `key: number` pairs; if the text mentions melancholy (低落, melancholy, melancholic, depression,
depressed, gloomy) swap the sad and melancholic scores (the model cannot tell them apart); clamp to [0, 1.2];
all zero -> calm 1.0. Where upstream would crash on a malformed reply (a JSON value that is not a number, a
"number" like "1.2.3", JSON that is not an object) the bad part counts as absent instead.
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from engine_ref.errors import InputError, ModelFilesError
from engine_ref.indextts2.emotion import EMOTIONS

SYSTEM_PROMPT = "文本情感分类"
# The model answers with these labels, in the order of EMOTIONS.
LABELS = ("高兴", "愤怒", "悲伤", "恐惧", "反感", "低落", "惊讶", "自然")
SAD, MELANCHOLIC = "悲伤", "低落"
MELANCHOLIC_WORDS = ("低落", "melancholy", "melancholic", "depression", "depressed", "gloomy")
MIN_SCORE, MAX_SCORE = 0.0, 1.2
THINK_END_TOKEN = "</think>"
QWEN3_THINK_END_ID = 151668  # what upstream hard-codes; used when the tokenizer does not know `</think>`
MAX_NEW_TOKENS = 32768
# A key (no spaces, quotes, colons, dots, commas), an optional closing quote, a colon, then digits and dots.
_PAIR = re.compile(r'([^\s":.,]+)"?\s*:\s*([\d.]+)')

QWEN_EMOTION_FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)


# --- parsing the reply (pure functions, testable on literal strings) ----------------------------------------------
def _as_score(value: Any) -> float:
    """A reply value as a float; anything that is not a finite number counts as 0."""
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return 0.0
    else:
        return 0.0
    return v if math.isfinite(v) else 0.0


def parse_scores(reply: str) -> dict[str, float]:
    """The raw label -> score mapping of a reply: a JSON object, else every `key: number` pair (last one wins)."""
    try:
        obj = json.loads(reply)
    except (json.JSONDecodeError, ValueError):
        obj = None
    if isinstance(obj, dict):
        return {str(k): _as_score(v) for k, v in obj.items()}
    scores: dict[str, float] = {}
    for m in _PAIR.finditer(reply):
        try:
            scores[m.group(1)] = float(m.group(2))
        except ValueError:  # "1.2.3" or "." : upstream raises here
            continue
    return scores


def mentions_melancholy(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in MELANCHOLIC_WORDS)


def scores_to_emotions(scores: Mapping[str, float], text: str) -> dict[str, float]:
    """Swap sad/melancholic when the text asks for melancholy, clamp, order as EMOTIONS; all zero -> calm 1."""
    scores = dict(scores)
    if mentions_melancholy(text):
        scores[SAD], scores[MELANCHOLIC] = scores.get(MELANCHOLIC, 0.0), scores.get(SAD, 0.0)
    out = {en: max(MIN_SCORE, min(MAX_SCORE, _as_score(scores.get(cn, 0.0)))) for en, cn in zip(EMOTIONS, LABELS)}
    if all(v <= 0.0 for v in out.values()):
        out["calm"] = 1.0
    return out


def parse_emotion_reply(reply: str, text: str) -> dict[str, float]:
    """The model's decoded answer + the analysed text -> {happy: .., ..., calm: ..} in EMOTIONS order."""
    return scores_to_emotions(parse_scores(reply), text)


def content_after_thinking(output_ids: list[int], think_end_id: int) -> list[int]:
    """Ids after the last `</think>` (all of them when there is none)."""
    for i in range(len(output_ids) - 1, -1, -1):
        if output_ids[i] == think_end_id:
            return output_ids[i + 1 :]
    return output_ids


# --- the model ---------------------------------------------------------------------------------------------------
def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class QwenEmotion:
    """Lazily loaded text-emotion model. `emotions(text)` -> {emotion: weight}; `vector(text)` -> 8 floats.

    dtype: upstream loads float16 (the default here too); device: where the model runs.
    """

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float16,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ):
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self._loaded: tuple[Any, Any, int] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any, int]:
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if not (self.model_dir / "config.json").is_file():
                raise InputError(
                    f"text emotion needs the Qwen emotion model, but {self.model_dir} has no config.json",
                    "copy qwen0.6bemo4-merge/ from the IndexTTS2 release into the model directory, "
                    "or pass an emotion vector or emotion audio instead",
                )
            try:
                import transformers
            except ImportError:
                raise InputError(
                    "text emotion needs the transformers package", "pip install 'transformers>=4.51,<6'"
                ) from None
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.model_dir), local_files_only=True, **_dtype_kwarg(self.dtype)
                )
            except Exception as exc:  # damaged/incomplete files surface as many exception types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelFilesError(
                    f"the Qwen emotion model in {self.model_dir} cannot be loaded ({first[:160]})",
                    "re-copy qwen0.6bemo4-merge/ from the IndexTTS2 release",
                ) from None
            model = model.to(self.device).eval()
            think_end = tok.convert_tokens_to_ids(THINK_END_TOKEN)
            if not isinstance(think_end, int) or think_end == tok.unk_token_id:
                think_end = QWEN3_THINK_END_ID
            self._loaded = (tok, model, think_end)
            return self._loaded

    def reply(self, text: str, seed: int | None = None) -> str:
        """The model's decoded answer to `text` (after thinking); seed makes sampling configs reproducible."""
        tok, model, think_end = self._load()
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        inputs = tok([prompt], return_tensors="pt").to(model.device)
        dev = torch.device(self.device)
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=tok.eos_token_id)
        new_ids = out[0][inputs["input_ids"].shape[1] :].tolist()
        return tok.decode(content_after_thinking(new_ids, think_end), skip_special_tokens=True)

    def emotions(self, text: str, seed: int | None = None) -> dict[str, float]:
        return parse_emotion_reply(self.reply(text, seed), text)

    def vector(self, text: str, seed: int | None = None) -> tuple[float, ...]:
        e = self.emotions(text, seed)
        return tuple(e[name] for name in EMOTIONS)


# --- a tiny random stand-in in the official file layout -------------------------------------------------------------
# Qwen-style chat format: <|im_start|>role\ncontent<|im_end|>\n; enable_thinking=False pre-fills an empty think block.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_CORPUS = [
    SYSTEM_PROMPT, *LABELS, '{"高兴": 0.0, "愤怒": 0.1, "悲伤": 0.75, "恐惧": 0.0, "反感": 0.0, "低落": 0.0}',
    '"惊讶": 0.2, "自然": 1.0}', "system user assistant", "I am so happy today, this is wonderful news!",
    "The danger is quietly approaching. 危险在悄悄逼近。委屈巴巴，今天真开心！0123456789",
]


def _write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Qwen2's pipeline: NFC, split by the GPT-4-style regex, byte-level, BPE without unk.
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    ids = {t: tok.token_to_id(t) for t in _SPECIALS}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **flags} for t, i in ids.items()}
    (out / "added_tokens.json").write_text(json.dumps(ids, ensure_ascii=False, indent=2), encoding="utf-8")
    specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False, "bos_token": None, "unk_token": None,
        "added_tokens_decoder": added, **specials, "chat_template": _CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(_CHAT_TEMPLATE, encoding="utf-8")
    return {"vocab_size": tok.get_vocab_size(), **ids}


def write_random_qwen_emotion(out_dir: str | Path, seed: int = 0) -> Path:
    """A TINY random Qwen3 causal LM + byte-level BPE tokenizer under the official file names (presets, tests).

    Its replies are garbage, so requests exercise the parser's fallback (-> calm 1.0). Greedy generation
    (generation_config.json do_sample false) keeps it deterministic.
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = _write_tokenizer(out)
    eos = [info["<|im_end|>"], info["<|endoftext|>"]]
    cfg = transformers.Qwen3Config(
        vocab_size=info["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=info["<|endoftext|>"], eos_token_id=eos[0],
        pad_token_id=info["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    gen = {"bos_token_id": info["<|endoftext|>"], "eos_token_id": eos, "pad_token_id": info["<|endoftext|>"],
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    for extra in set(p.name for p in out.iterdir()) - set(QWEN_EMOTION_FILES):
        (out / extra).unlink()
    return out
