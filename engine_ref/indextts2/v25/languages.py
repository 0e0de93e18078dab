"""IndexTTS-2.5's language table: the tag a segment is prefixed with and the row of ``lang_embedding``.

Upstream's table is Whisper's 99 language codes in Whisper's order, then ``yue`` and six additions (minnan, wuyu,
dialect, zh/en, en/zh, common): 106 names, whose position is the language id (en 0, zh 1, es 3, ja 7, ar 13,
common 105). ``lang_embedding`` has one row more (107). Only the first 99 names are special tokens of the
tokenizer (``<|yue|>`` is not). A language outside the table maps to ``common``; upstream still writes its tag
``<|name|> `` in front of the text, where it is then ordinary text (e.g. ``zhen``).

Supported here: the five languages IndexTTS-2.5 is released for, plus ``zhen`` (mixed Chinese-English, which
upstream normalises like Chinese); anything else is a one-line InputError naming them.
"""

from __future__ import annotations

from engine_ref.errors import InputError

__all__ = ["LANGUAGES", "TAGGED_LANGUAGES", "SUPPORTED_LANGUAGES", "LANGUAGE_ROWS", "COMMON", "language_id",
           "language_prefix", "check_language"]

_WHISPER = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
).split()
#: Every language name, in upstream's order: the index is the language id.
LANGUAGES: tuple[str, ...] = (*_WHISPER, "yue", "minnan", "wuyu", "dialect", "zh/en", "en/zh", "common")
#: The language names that are special tokens of the vocabulary (upstream registers the first 99).
TAGGED_LANGUAGES: tuple[str, ...] = LANGUAGES[:99]
LANGUAGE_ROWS = len(LANGUAGES) + 1  # lang_embedding rows (107)
COMMON = "common"
SUPPORTED_LANGUAGES = ("zh", "en", "ja", "es", "ar", "zhen")
_IDS = {name: i for i, name in enumerate(LANGUAGES)}


def check_language(lang: object) -> str:
    """The lower-cased language code, or an InputError naming the supported ones (also for a missing one:
    IndexTTS-2.5 has no language detection, upstream's infer() requires `lang`)."""
    if lang is None or (isinstance(lang, str) and not lang.strip()):
        raise InputError("IndexTTS-2.5 needs the language of the text and none was given",
                         f"pass one of {', '.join(SUPPORTED_LANGUAGES)} (e.g. --lang zh)")
    if not isinstance(lang, str) or lang.strip().lower() not in SUPPORTED_LANGUAGES:
        raise InputError(f"language {lang!r} is not supported by IndexTTS-2.5",
                         f"pass one of {', '.join(SUPPORTED_LANGUAGES)} (e.g. --lang zh)")
    return lang.strip().lower()


def language_id(lang: str) -> int:
    """The lang_embedding row of a language (upstream lang_to_token: unknown names -> common)."""
    return _IDS.get(lang.lower(), _IDS[COMMON])


def language_prefix(lang: str) -> str:
    """The text put in front of every segment: ``<|lang|> `` (lower-case, one space)."""
    return f"<|{lang.lower()}|> "
