"""Text cleaning for a bilingual corpus: normalisation, traditional -> simplified Chinese, language id, quality
rules per language, PII scrubbing.

English rules follow Gopher (word counts, mean word length, alphabetic words, stop words, symbol ratio,
repetition) and C4 (terminal punctuation, lorem ipsum, code braces); Chinese rules follow WuDaoCorpora's
cleaning (share of Chinese characters, minimum Chinese length, garbled text, boilerplate lines). Thresholds
live in `CleanSettings` (wudao/config/sections.py) with their defaults documented there.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, lru_cache

from wudao.config import CleanSettings

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# Mojibake and decoding debris: U+FFFD, GBK/UTF-8 confusions ("锟斤拷", "烫烫烫"), UTF-8 read as Latin-1.
_GARBLED = re.compile(r"\ufffd|锟斤拷|烫烫烫|屯屯屯|Ã[\u0080-\u00bf]|â€[\u0080-\u00bf™œ\"”“]")

# WuDaoCorpora-style navigation/boilerplate lines (removed line by line before the quality check).
_ZH_BOILERPLATE = re.compile(
    r"版权所有|copyright|all rights reserved|联系我们|关于我们|免责声明|返回顶部|上一篇|下一篇|点击(这里|此处|进入|查看)"
    r"|扫一扫|关注我们|ICP备|公网安备|网站地图|设为首页|加入收藏|责任编辑",
    re.IGNORECASE,
)
_EN_STOP_WORDS = frozenset(
    ("the", "be", "to", "of", "and", "that", "have", "with", "is", "in", "a", "it", "for", "on", "are", "as")
)

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_CN_ID = re.compile(r"(?<!\d)\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx])")
_CN_MOBILE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d{2,4}\)?[- .]\d{3,4}[- .]\d{3,4}(?![\w])")

EMAIL_TOKEN, PHONE_TOKEN, ID_TOKEN = "<EMAIL>", "<PHONE>", "<ID>"


# Control (Cc), format (Cf) and private-use (Co) characters, except tab and newline: one regex pass instead of a
# per-character Python loop.
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ue000-\uf8ff\U000f0000-\U0010ffff]"
)


def normalize(text: str) -> str:
    """NFKC, control characters dropped (newlines and tabs kept), runs of spaces and blank lines collapsed."""
    text = _CONTROL.sub("", unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", text)  # the pattern never spans a newline: the same as line by line, in one pass
    if "\n" not in text:
        return text.strip()
    return _BLANK_LINES.sub("\n\n", "\n".join([line.strip() for line in text.split("\n")])).strip()


_MAYBE_NUMBER = re.compile(r"\d{3}")


def scrub_pii(text: str) -> str:
    """E-mail addresses, Chinese ID numbers and phone numbers become placeholders (IDs first: they are digits too)."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_TOKEN, text)
    if _MAYBE_NUMBER.search(text):  # most documents have no run of digits: skip three regex passes
        text = _CN_ID.sub(ID_TOKEN, text)
        text = _CN_MOBILE.sub(PHONE_TOKEN, text)
        text = _PHONE.sub(PHONE_TOKEN, text)
    return text


_SPACE_CHARS = re.compile(r"\s+")
_ENGLISH_ONLY_WORDS = frozenset(("the", "and", "of", "to", "is", "was", "that", "with", "for", "are", "this", "which"))


def _plainly_english(text: str) -> bool:
    if not text.isascii():
        return False
    words = text.lower().split()
    return len(words) >= 20 and sum(map(_ENGLISH_ONLY_WORDS.__contains__, words)) >= 0.12 * len(words)


_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")


def han_count(text: str) -> int:
    # Counted by deletion (one C-level pass) rather than by materialising a list of every character.
    return 0 if text.isascii() else len(text) - len(_HAN.sub("", text))


def han_ratio(text: str, han: int | None = None) -> float:
    """Share of Chinese characters among the non-space characters (`han`: their count, when already known)."""
    han = han_count(text) if han is None else han
    if not han:
        return 0.0
    non_space = len(_SPACE_CHARS.sub("", text))
    return han / non_space if non_space else 0.0


@dataclass
class Cleaned:
    text: str
    lang: str
    """`zh`, `en` or `other`."""
    rejected: str | None = None
    """Which rule rejected the document (None: accepted)."""


class Cleaner:
    """Stateless per document; builds the language detector once (its models ship inside the lingua wheel)."""

    def __init__(self, cfg: CleanSettings):
        self.cfg = cfg

    @staticmethod
    def shared(cfg: CleanSettings) -> Cleaner:
        """One cleaner per process and settings: building the language detector takes seconds and memory."""
        return _shared_cleaner(cfg.model_dump_json())

    @cached_property
    def _detector(self):
        from lingua import Language, LanguageDetectorBuilder

        # A small set of likely languages keeps detection fast and accurate; anything else is tagged "other".
        languages = [
            Language.ENGLISH,
            Language.CHINESE,
            Language.JAPANESE,
            Language.KOREAN,
            Language.FRENCH,
            Language.GERMAN,
            Language.SPANISH,
            Language.RUSSIAN,
            Language.PORTUGUESE,
            Language.ITALIAN,
        ]
        return LanguageDetectorBuilder.from_languages(*languages).with_preloaded_language_models().build()

    @cached_property
    def _t2s(self):
        import opencc

        return opencc.OpenCC("t2s")

    def languages(self, texts: list[str]) -> list[str]:
        """`zh`, `en` or `other` per text; the model runs once over the batch (lingua parallelises in Rust)."""
        from lingua import Language

        # Chinese script settles it cheaply, and so does plainly English prose: ASCII text in which function words
        # found in no other language ("the", "and", "of", …) are frequent. Only the rest goes to the model.
        out = ["zh" if han_ratio(t[:2000]) >= 0.3 else ("en" if _plainly_english(t[:2000]) else "") for t in texts]
        todo = [i for i, lang in enumerate(out) if not lang]
        if todo:
            # The first 500 characters settle the language of a document; more only costs time.
            all_confidences = self._detector.compute_language_confidence_values_in_parallel(
                [texts[i][:500] for i in todo]
            )
            for i, confidences in zip(todo, all_confidences):
                # Short English full of proper names ("Liechtenstein uses the Swiss Franc") can score slightly
                # higher for another language; a fair English confidence suffices when only zh and en are kept.
                # Text without letters scores 0 for every language, listed in an arbitrary order: that is "other",
                # not whichever language happens to come first.
                best = confidences[0] if confidences and confidences[0].value > 0 else None
                english = next((c.value for c in confidences if c.language == Language.ENGLISH), 0.0)
                if best is not None and (best.language == Language.ENGLISH or english >= 0.25):
                    out[i] = "en"
                else:
                    out[i] = "zh" if best is not None and best.language == Language.CHINESE else "other"
        return out

    def __call__(self, raw: str) -> Cleaned:
        return self.clean_many([raw])[0]

    def clean_many(self, raws: list[str]) -> list[Cleaned]:
        texts = [normalize(r) for r in raws]
        langs = self.languages(texts)
        return [self._clean(t, lang) if t else Cleaned("", "other", "empty") for t, lang in zip(texts, langs)]

    def _clean(self, text: str, lang: str) -> Cleaned:
        if lang == "zh":
            if self.cfg.traditional_to_simplified:
                text = self._t2s.convert(text)
            if _ZH_BOILERPLATE.search(text):  # no pattern spans a newline: a miss on the whole text is a miss per line
                text = "\n".join(line for line in text.split("\n") if not _ZH_BOILERPLATE.search(line))
            text = text.strip()
            reason = self._zh_quality(text)
        elif lang == "en":
            reason = self._en_quality(text)
        else:
            reason = None if self.cfg.keep_other_languages else "other_language"
        if self.cfg.scrub_pii:
            text = scrub_pii(text)
        return Cleaned(text, lang, reason)

    def normalize_caption(self, caption: str) -> str:
        """Captions get the same normalisation, script conversion and PII scrubbing, but no quality rules."""
        text = normalize(caption)
        if self.cfg.traditional_to_simplified and han_ratio(text) > 0:
            text = self._t2s.convert(text)
        return scrub_pii(text) if self.cfg.scrub_pii else text

    def _garbled(self, text: str) -> bool:
        if text.isascii():  # every garbled pattern has a non-ASCII character
            return False
        return len(_GARBLED.findall(text)) / max(1, len(text)) > self.cfg.max_garbled_ratio

    def _zh_quality(self, text: str) -> str | None:
        c = self.cfg
        if self._garbled(text):
            return "garbled"
        han = han_count(text)
        if han < c.zh_min_chars:
            return "zh_too_short"
        if han_ratio(text, han) < c.zh_min_han_ratio:
            return "zh_low_han_ratio"
        return self._repetition(list(text.replace("\n", "")), c.max_top_ngram_fraction)

    def _en_quality(self, text: str) -> str | None:
        c = self.cfg
        if self._garbled(text):
            return "garbled"
        if "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        if c.en_reject_curly_braces and "{" in text:
            return "code_braces"
        words = _WORD.findall(text)
        if not c.en_min_words <= len(words) <= c.en_max_words:
            return "en_word_count"
        mean_len = sum(map(len, words)) / len(words)
        if not c.en_min_mean_word_length <= mean_len <= c.en_max_mean_word_length:
            return "en_mean_word_length"
        tokens = text.split()
        if len(_ALPHA_TOKEN.findall(text)) / len(tokens) < c.en_min_alpha_word_ratio:
            return "en_alpha_ratio"
        lowered = list(map(str.lower, words))
        if sum(map(_EN_STOP_WORDS.__contains__, lowered)) < c.en_min_stop_words:
            return "en_stop_words"
        if (text.count("#") + text.count("...") + text.count("…")) / len(tokens) > c.en_max_symbol_word_ratio:
            return "en_symbols"
        lines = [line for line in text.split("\n") if line.strip()]
        if (
            sum(1 for line in lines if line.rstrip().endswith((".", "!", "?", '"', "'"))) / len(lines)
            < c.en_min_terminal_punct_lines
        ):
            return "en_terminal_punctuation"
        return self._repetition(lowered, c.max_top_ngram_fraction)

    @staticmethod
    def _repetition(units: list[str], max_fraction: float) -> str | None:
        """Gopher's top-2-gram check: reject when one bigram covers too much of the text (spam, menus)."""
        if len(units) < 100:
            return None  # Gopher applies it to pages of 50+ words; on a few sentences a repeated name trips it
        bigrams = Counter(zip(units, units[1:]))
        (top, count) = bigrams.most_common(1)[0]
        covered = count * sum(map(len, top))
        total = sum(map(len, units))
        return "repetition" if covered / total > max_fraction else None


@lru_cache(maxsize=4)
def _shared_cleaner(cfg_json: str) -> Cleaner:
    return Cleaner(CleanSettings.model_validate_json(cfg_json))
