"""Text normalization before tokenization, modelled on IndexTTS 1.5's TextNormalizer without WeTextProcessing.

IndexTTS was trained on text that WeTextProcessing (pynini grammars) had normalized: numbers spelled out, Chinese
punctuation rewritten to a small ASCII set. The model never saw digits next to most words, so a frontend that skips
this step makes it mumble. WeTextProcessing needs pynini/OpenFst (C++), which we do not want in a serving image, so
this module re-creates the parts that matter most with plain regular expressions:

* language choice as upstream: Chinese when the text has a CJK ideograph, has no Latin letter, is a bare e-mail
  address, or contains tone-numbered pinyin (``xuan4``); English otherwise;
* the upstream ``'s`` contraction rewrite (``where's`` -> ``where is``) in both languages;
* pinyin-with-tone protection: tone digits are not verbalized, and ``j/q/x`` + ``u``/``ü`` is respelled with ``v``;
* number verbalization: cardinals, decimals, negatives, percentages, currency, clock times, ordinals (English),
  years, dates and measure units (Chinese), long digit strings read digit by digit;
* the upstream punctuation rewrite map (full-width/CJK punctuation, quotes and brackets to ``, . ! ? ' - …``).

Known deviations from WeTextProcessing (documented, not bugs): no traditional-to-simplified conversion, no
English abbreviation/date/measure grammar, no name protection (our rules never rewrite the ``·``/``-`` between
Chinese names, so upstream's placeholder dance is unnecessary), and readings of rare number forms may differ.
"""

from __future__ import annotations

import re
from typing import Callable, Literal

Language = Literal["zh", "en"]

# ---------------------------------------------------------------------------------------------------------------
# Punctuation rewrite (upstream char_rep_map). The ORDER matters: replacement is one regex alternation scanned left
# to right, and at a given position the first listed key that matches wins. So "，，，" becomes ",,," (the single
# "，" key is listed first), while ",,," becomes "…". Kept as an immutable tuple of pairs to preserve that order.
_PUNCT_PAIRS: tuple[tuple[str, str], ...] = (
    ("：", ","), ("；", ","), (";", ","), ("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("\n", " "),
    ("·", "-"), ("、", ","), ("...", "…"), (",,,", "…"), ("，，，", "…"), ("……", "…"),
    ("“", "'"), ("”", "'"), ('"', "'"), ("‘", "'"), ("’", "'"), ("（", "'"), ("）", "'"), ("(", "'"), (")", "'"),
    ("《", "'"), ("》", "'"), ("【", "'"), ("】", "'"), ("[", "'"), ("]", "'"),
    ("—", "-"), ("～", "-"), ("~", "-"), ("「", "'"), ("」", "'"), (":", ","),
)
# Chinese text additionally turns a leftover dollar sign into a full stop (upstream zh_char_rep_map puts it first).
_ZH_PUNCT_PAIRS: tuple[tuple[str, str], ...] = (("$", "."),) + _PUNCT_PAIRS


def _compile_rewriter(pairs: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    table = dict(pairs)
    pattern = re.compile("|".join(re.escape(key) for key, _ in pairs))
    return lambda text: pattern.sub(lambda m: table[m.group()], text)


_rewrite_en = _compile_rewriter(_PUNCT_PAIRS)
_rewrite_zh = _compile_rewriter(_ZH_PUNCT_PAIRS)


def rewrite_punctuation(text: str, language: Language) -> str:
    """Apply the upstream punctuation map (the Chinese variant also maps ``$`` to ``.``)."""
    return _rewrite_zh(text) if language == "zh" else _rewrite_en(text)


# ---------------------------------------------------------------------------------------------------------------
# Language detection and pinyin.
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[a-zA-Z]")
_EMAIL = re.compile(r"^[a-zA-Z0-9]+@[a-zA-Z0-9]+\.[a-zA-Z]+$")

_INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "z", "c",
             "s", "r", "y", "w")
# Finals accepted after an optional initial; the set mirrors upstream's v1.5 pattern (which also admits a few
# non-standard spellings such as "vn"/"vang"), longest first so the alternation reads naturally.
_FINALS = ("iang", "iong", "uang", "vang", "üang", "ang", "eng", "ing", "ong", "uai", "uan", "van", "üan", "ian",
           "iao", "ai", "ei", "ua", "ui", "uo", "ao", "ou", "ia", "iu", "ie", "ue", "üe", "ve", "an", "en", "in",
           "un", "vn", "a", "o", "e", "i", "u", "ü", "v")
PINYIN_TONE = re.compile(
    r"(?<![a-z])((?:" + "|".join(_INITIALS) + r")?(?:" + "|".join(_FINALS) + r")|ng|er)([1-5])",
    re.IGNORECASE,
)
_JQX_U = re.compile(r"^([jqx])[uü]((?:n|e|an)*)([1-5])$", re.IGNORECASE)


def detect_language(text: str) -> Language:
    """Upstream's rule: Chinese unless the text has Latin letters, no ideograph, and no tone-numbered pinyin."""
    if _HAN.search(text) or not _LATIN.search(text) or _EMAIL.match(text):
        return "zh"
    return "zh" if PINYIN_TONE.search(text) else "en"


def respell_pinyin(syllable: str) -> str:
    """``ju4`` -> ``JV4``: after j/q/x the vowel u/ü is written v (the vocabulary's spelling), then upper-cased."""
    if syllable[:1].lower() not in ("j", "q", "x"):
        return syllable
    return _JQX_U.sub(r"\1v\2\3", syllable).upper()


# ---------------------------------------------------------------------------------------------------------------
# Contractions: upstream expands only "'s" after a short list of pronouns/question words (no leading word
# boundary, exactly as upstream, so "bit's" also becomes "bit is").
_CONTRACTION = re.compile(r"(what|where|who|which|how|t?here|it|s?he|that|this)'s", re.IGNORECASE)


def expand_contractions(text: str) -> str:
    """``it's`` -> ``it is`` for the pronouns upstream lists; other apostrophes are left alone."""
    return _CONTRACTION.sub(lambda m: m.group(1) + " is", text)


# ---------------------------------------------------------------------------------------------------------------
# English numbers.
_EN_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
             "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_EN_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_EN_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                         "nine": "ninth", "twelve": "twelfth"}
_MAX_CARDINAL = 10**15  # longer integers are read digit by digit (ids, card numbers): nobody says "quadrillion"


def _en_below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_EN_SMALL[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_EN_TENS[n // 10])
        n %= 10
        if n:
            words.append(_EN_SMALL[n])
    elif n or not words:
        words.append(_EN_SMALL[n])
    return words


def en_cardinal(n: int) -> str:
    """1024 -> "one thousand twenty four" (no "and", no hyphens: hyphens are segmentation points downstream)."""
    if n < 0:
        return "minus " + en_cardinal(-n)
    if n >= _MAX_CARDINAL:
        return en_digits(str(n))
    words: list[str] = []
    for value, name in _EN_SCALES:
        if n >= value:
            words += _en_below_thousand(n // value) + [name]
            n %= value
    if n or not words:
        words += _en_below_thousand(n)
    return " ".join(words)


def en_ordinal(n: int) -> str:
    """21 -> "twenty first"."""
    words = en_cardinal(n).split()
    last = words[-1]
    if last in _EN_ORDINAL_IRREGULAR:
        words[-1] = _EN_ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def en_digits(digits: str) -> str:
    """"007" -> "zero zero seven"."""
    return " ".join(_EN_SMALL[int(d)] for d in digits)


def _en_number(token: str) -> str:
    """An unsigned number token (digits, optional fraction) in words."""
    whole, _, frac = token.partition(".")
    if len(whole) > 1 and whole.startswith("0") or len(whole) > 15:
        spoken = en_digits(whole)
    else:
        spoken = en_cardinal(int(whole))
    return spoken + (" point " + en_digits(frac) if frac else "")


# ---------------------------------------------------------------------------------------------------------------
# Chinese numbers.
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_SMALL_UNITS = ("", "十", "百", "千")
_ZH_BIG_UNITS = ("", "万", "亿", "万亿")


def _zh_below_10000(n: int) -> str:
    out: list[str] = []
    pending_zero = False
    for power in (3, 2, 1, 0):
        digit = n // 10**power % 10
        if digit == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_ZH_DIGITS[digit] + _ZH_SMALL_UNITS[power])
    return "".join(out)


def zh_cardinal(n: int) -> str:
    """1024 -> 一千零二十四, 100010000 -> 一亿零一万, 12 -> 十二 (a leading 一十 is read 十)."""
    if n < 0:
        return "负" + zh_cardinal(-n)
    if n == 0:
        return "零"
    if n >= _MAX_CARDINAL:
        return zh_digits(str(n))
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    out: list[str] = []
    need_zero = False
    for level in range(len(groups) - 1, -1, -1):
        group = groups[level]
        if group == 0:
            need_zero = bool(out)
            continue
        if out and (need_zero or group < 1000):
            out.append("零")
        out.append(_zh_below_10000(group) + _ZH_BIG_UNITS[level])
        need_zero = False
    text = "".join(out)
    return text[1:] if text.startswith("一十") else text


def zh_digits(digits: str) -> str:
    """"2002" -> 二零零二 (years, phone numbers, codes)."""
    return "".join(_ZH_DIGITS[int(d)] for d in digits)


def _zh_number(token: str) -> str:
    whole, _, frac = token.partition(".")
    if len(whole) > 1 and whole.startswith("0") or len(whole) > 15:
        spoken = zh_digits(whole)
    else:
        spoken = zh_cardinal(int(whole))
    return spoken + ("点" + zh_digits(frac) if frac else "")


# ---------------------------------------------------------------------------------------------------------------
# Rule tables. Each rule is (pattern, replacement); applied in order, so specific forms come before bare numbers.
_NUM = r"[0-9]+(?:\.[0-9]+)?"
_GROUPED = re.compile(r"(?<![0-9.,])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9]|,[0-9])")  # 1,234,567 -> 1234567
_DOTTED = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){2,}(?![0-9])")  # 1.2.3 (versions, section numbers)
_DIGIT_GROUPS = re.compile(r"(?<![0-9])[0-9]+(?:-[0-9]+)+(?![0-9])")  # 135-4567-8900
_TIME = re.compile(r"(?<![0-9:])([01]?[0-9]|2[0-4]):([0-5][0-9])(?::([0-5][0-9]))?(?![0-9:])")
_MINUS = re.compile(r"(?<![0-9A-Za-z.])-(?=[0-9])")
_BARE_NUMBER = re.compile(_NUM)


def _digit_groups(match: re.Match[str], read: Callable[[str], str], spaced: bool) -> str:
    """Phone-like groups (7+ digits in all) are read digit by digit; short ranges such as 3-5 stay numbers."""
    parts = match.group().split("-")
    if sum(len(p) for p in parts) < 7:
        return match.group()
    joiner = " - " if spaced else "-"
    return joiner.join(read(p) for p in parts)


def _pad(spoken: str, match: re.Match[str]) -> str:
    """Surround an English replacement with spaces when it touches a letter or digit (F5 -> F five)."""
    text, start, end = match.string, match.start(), match.end()
    left = " " if start > 0 and text[start - 1].isalnum() else ""
    right = " " if end < len(text) and text[end].isalnum() else ""
    return left + spoken + right


_EN_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
                "€": ("euro", "euros", "cent", "cents"), "¥": ("yuan", "yuan", "fen", "fen"),
                "￥": ("yuan", "yuan", "fen", "fen")}


def _en_money(match: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _EN_CURRENCY[match.group(1)]
    whole, _, frac = match.group(2).partition(".")
    amount = int(whole)
    spoken = f"{en_cardinal(amount)} {one if amount == 1 else many}"
    if len(frac) == 2 and int(frac):
        cents = int(frac)
        spoken += f" {en_cardinal(cents)} {sub_one if cents == 1 else sub_many}"
    elif frac and int(frac):
        spoken = f"{_en_number(match.group(2))} {many}"
    return _pad(spoken, match)


def _en_time(match: re.Match[str]) -> str:
    hour, minute, second = int(match.group(1)), int(match.group(2)), match.group(3)
    after = match.string[match.end():match.end() + 4].strip().lower()
    if minute == 0:
        spoken = en_cardinal(hour) + ("" if after.startswith(("am", "pm", "a.m", "p.m")) else " o'clock")
    elif minute < 10:
        spoken = f"{en_cardinal(hour)} oh {en_cardinal(minute)}"
    else:
        spoken = f"{en_cardinal(hour)} {en_cardinal(minute)}"
    if second and int(second):
        spoken += f" and {en_cardinal(int(second))} seconds"
    return _pad(spoken, match)


_EN_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (_GROUPED, lambda m: m.group().replace(",", "")),
    (_TIME, _en_time),
    (re.compile(r"([$£€¥￥])\s?(" + _NUM + r")"), _en_money),
    (re.compile(r"(" + _NUM + r")\s?%"), lambda m: _pad(_en_number(m.group(1)) + " percent", m)),
    (re.compile(r"(?<![0-9])([0-9]+)(st|nd|rd|th)\b", re.IGNORECASE),
     lambda m: _pad(en_ordinal(int(m.group(1))), m)),
    (_DOTTED, lambda m: _pad(" point ".join(_en_number(p) for p in m.group().split(".")), m)),
    (_DIGIT_GROUPS, lambda m: _digit_groups(m, en_digits, spaced=True)),
    (_MINUS, lambda m: "minus "),
    (re.compile(r"(?<=[0-9])\+(?![0-9])"), lambda m: " plus"),
    (_BARE_NUMBER, lambda m: _pad(_en_number(m.group()), m)),
)

_ZH_UNITS = (("km/h", "千米每小时"), ("km", "千米"), ("kg", "千克"), ("cm", "厘米"), ("mm", "毫米"), ("ml", "毫升"),
             ("m", "米"), ("g", "克"), ("L", "升"), ("°C", "摄氏度"), ("℃", "摄氏度"))
_ZH_UNIT_TABLE = dict(_ZH_UNITS)
_ZH_CURRENCY = {"$": "美元", "¥": "元", "￥": "元", "€": "欧元", "£": "英镑"}


def _zh_date(match: re.Match[str]) -> str:
    year, month, day = match.group(1), int(match.group(2)), int(match.group(3))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return match.group()
    return f"{zh_digits(year)}年{zh_cardinal(month)}月{zh_cardinal(day)}日"


def _zh_time(match: re.Match[str]) -> str:
    hour, minute, second = int(match.group(1)), int(match.group(2)), match.group(3)
    spoken = zh_cardinal(hour) + "点"
    if minute:
        spoken += ("零" if minute < 10 else "") + zh_cardinal(minute) + "分"
    if second and int(second):
        spoken += zh_cardinal(int(second)) + "秒"
    return spoken


_ZH_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (_GROUPED, lambda m: m.group().replace(",", "")),
    (re.compile(r"(?<![0-9])([0-9]{4})[-/.]([0-9]{1,2})[-/.]([0-9]{1,2})(?![0-9])"), _zh_date),
    (re.compile(r"(?<![0-9])([0-9]{4})(?=年)"), lambda m: zh_digits(m.group(1))),
    (re.compile(r"(?<![0-9])([0-9]{1,2})(?=[月日号])"), lambda m: zh_cardinal(int(m.group(1)))),
    (_TIME, _zh_time),
    (re.compile(r"([$¥￥€£])\s?(" + _NUM + r")"), lambda m: _zh_number(m.group(2)) + _ZH_CURRENCY[m.group(1)]),
    (re.compile(r"(" + _NUM + r")\s?%"), lambda m: "百分之" + _zh_number(m.group(1))),
    (re.compile(r"(" + _NUM + r")\s?(" + "|".join(re.escape(u) for u, _ in _ZH_UNITS) + r")(?![A-Za-z])"),
     lambda m: _zh_number(m.group(1)) + _ZH_UNIT_TABLE[m.group(2)]),
    (_DOTTED, lambda m: "点".join(_zh_number(p) for p in m.group().split("."))),
    (_DIGIT_GROUPS, lambda m: _digit_groups(m, zh_digits, spaced=False)),
    (_MINUS, lambda m: "负"),
    (re.compile(r"(?<=[0-9])\+(?![0-9])"), lambda m: "多"),
    (_BARE_NUMBER, lambda m: _zh_number(m.group())),
)


def _apply_rules(text: str, rules: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...]) -> str:
    for pattern, replace in rules:
        text = pattern.sub(replace, text)
    return text


def verbalize_numbers(text: str, language: Language) -> str:
    """Spell out every ASCII digit sequence in ``text`` (no pinyin protection here: see `normalize`)."""
    return _apply_rules(text, _ZH_RULES if language == "zh" else _EN_RULES)


# ---------------------------------------------------------------------------------------------------------------
_FULL_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def to_half_width(text: str) -> str:
    """Full-width ASCII variants (Ａ１，) to ASCII, as WeTextProcessing's Chinese post-processor does."""
    return text.translate(_FULL_WIDTH)


_SPACES = re.compile(r"\s+")


def _normalize_zh(text: str) -> str:
    # Tone-numbered pinyin must keep its digit, so only the text between syllables is verbalized.
    pieces: list[str] = []
    cursor = 0
    for match in PINYIN_TONE.finditer(text):
        pieces.append(verbalize_numbers(to_half_width(text[cursor:match.start()]), "zh"))
        pieces.append(respell_pinyin(match.group()))
        cursor = match.end()
    pieces.append(verbalize_numbers(to_half_width(text[cursor:]), "zh"))
    return rewrite_punctuation("".join(pieces), "zh")


def normalize(text: str, language: Language | None = None) -> str:
    """Normalize raw user text the way IndexTTS 1.5 does before tokenization (see the module docstring).

    ``language`` overrides the upstream detection (useful for tests and for callers that know better).
    The result has single spaces and no leading/trailing whitespace; it may be empty (e.g. only whitespace).
    """
    lang = language or detect_language(text)
    text = expand_contractions(text)
    if lang == "zh":
        text = _normalize_zh(text.rstrip())
    else:
        text = rewrite_punctuation(verbalize_numbers(text, "en"), "en")
    return _SPACES.sub(" ", text).strip()
