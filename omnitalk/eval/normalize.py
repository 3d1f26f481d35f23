"""English text normalisation for word error rates, in the spirit of Whisper's EnglishTextNormalizer.

Written from the description of what such a normaliser must do, not from its code:

1. Unicode NFKC, curly quotes -> straight, lowercase.
2. Drop text in brackets ``[...]``, ``(...)``, ``<...>``, ``{...}`` (annotations such as ``[noise]``).
3. Drop hesitation fillers (``uh``, ``um``, ``hmm``, ``mm``, ``mhm``, ...).
4. Expand contractions (``won't`` -> ``will not``, ``they're`` -> ``they are``, ``it's`` -> ``it is``) and
   informal forms (``gonna`` -> ``going to``); titles (``mr`` -> ``mister``).
5. British -> American spellings for common words (``colour`` -> ``color``).
6. Symbols that are words (``%`` -> ``percent``, ``&`` -> ``and``); other punctuation -> space, apostrophes
   removed, thousands separators ``1,000`` -> ``1000``; decimal points between digits are kept.
7. Spelled-out numbers -> digits (``twenty one`` -> ``21``, ``three hundred and five`` -> ``305``,
   ``nineteen ninety nine`` -> ``1999``, ``twenty first`` -> ``21st``, ``three point five`` -> ``3.5``).
8. Collapse whitespace.

Both the reference and the hypothesis go through the same function, so a choice (digits, American
spelling) only has to be consistent. `number_to_words` / `digits_to_words` go the other way (0 up to
999,999,999), for writing numbers as a speech synthesiser should say them.
"""
from __future__ import annotations

import re
import unicodedata

__all__ = ["EnglishTextNormalizer", "normalize", "words_to_digits", "digits_to_words", "number_to_words"]

# ---------------------------------------------------------------------------------------------
# number words
# ---------------------------------------------------------------------------------------------

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}

_SMALL = {w: i for i, w in enumerate(UNITS)}
_SMALL.update({w: 10 * i for i, w in enumerate(TENS) if w})
_SMALL["fourty"] = 40  # a frequent misspelling

_ORDINAL_SMALL = {"zeroth": 0, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
                  "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
                  "thirteenth": 13, "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17,
                  "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "fortieth": 40,
                  "fiftieth": 50, "sixtieth": 60, "seventieth": 70, "eightieth": 80, "ninetieth": 90}
_ORDINAL_SCALES = {"hundredth": 100, "thousandth": 1000, "millionth": 1_000_000, "billionth": 1_000_000_000}


def _ordinal_suffix(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def number_to_words(n: int) -> str:
    """0 <= n < 10**12 -> 'three hundred and five' style words (British 'and' after hundred omitted:
    'three hundred five'). Negative numbers get 'minus'."""
    n = int(n)
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return UNITS[n]
    if n < 100:
        t, u = divmod(n, 10)
        return TENS[t] + ("" if u == 0 else " " + UNITS[u])
    if n < 1000:
        h, r = divmod(n, 100)
        return UNITS[h] + " hundred" + ("" if r == 0 else " " + number_to_words(r))
    for name, value in (("billion", 10**9), ("million", 10**6), ("thousand", 1000)):
        if n >= value:
            if n >= 1000 * value and name == "billion":
                raise ValueError(f"number_to_words supports 0..10**12-1, got {n}")
            q, r = divmod(n, value)
            return number_to_words(q) + " " + name + ("" if r == 0 else " " + number_to_words(r))
    raise AssertionError("unreachable")


def digits_to_words(text: str) -> str:
    """Replace every whole run of digits (optionally with thousands commas) by its words:
    'i have 21 cats' -> 'i have twenty one cats'. Decimals 'x.y' become 'x point y z'."""
    def one(m: re.Match) -> str:
        whole, frac = m.group(1).replace(",", ""), m.group(2)
        words = number_to_words(int(whole))
        if frac:
            words += " point " + " ".join(UNITS[int(d)] for d in frac)
        return words
    return re.sub(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w])", one, text)


class _NumberParser:
    """Turns a token list with spelled numbers into one with digit strings; greedy, left to right."""

    def __init__(self, tokens: list[str]):
        self.toks = tokens

    def run(self) -> list[str]:
        out: list[str] = []
        i, toks = 0, self.toks
        while i < len(toks):
            j, value, ordinal = self._number_at(i)
            if j == i:
                out.append(toks[i])
                i += 1
                continue
            # decimals: "<number> point <digit words>"
            if not ordinal and j + 1 < len(toks) and toks[j] == "point" and _SMALL.get(toks[j + 1], 99) < 10:
                k, frac = j + 1, ""
                while k < len(toks) and _SMALL.get(toks[k], 99) < 10:
                    frac += str(_SMALL[toks[k]])
                    k += 1
                out.append(f"{value}.{frac}")
                i = k
                continue
            out.append(f"{value}{_ordinal_suffix(value)}" if ordinal else str(value))
            i = j
        return out

    def _number_at(self, i: int) -> tuple[int, int, bool]:
        """The longest spelled number starting at token i -> (end index, value, is_ordinal).

        end == i when no number starts there. Grammar (a group is a value below 1000):
        group  := small | small "hundred" ["and"] [small] | year
        small  := unit | teen | tens [unit]          (0..99)
        year   := (11..99, not a multiple of 10) (teen | tens [unit] | "oh" unit)   -> 1999, 1905
        number := group [scale ["and"] group ...]     with decreasing scales (thousand, million, billion)
        "a hundred" / "a thousand" count as one. An ordinal word ends the number (twenty first -> 21st).
        """
        toks, n = self.toks, len(self.toks)
        total, cur = 0, 0
        last = None          # None, 'unit', 'teen', 'tens', 'hundred', 'scale'
        has_hundred = False  # the current group already has "hundred" (or is a year)
        last_scale = None
        j = i
        if toks[i] == "a" and i + 1 < n and toks[i + 1] in SCALES:
            cur, last, j = 1, "unit", i + 1
        while j < n:
            w = toks[j]
            small, ordinal = (_SMALL[w], False) if w in _SMALL else (_ORDINAL_SMALL.get(w), True)
            if small is not None:
                kind = "unit" if small < 10 else ("teen" if small < 20 else "tens")
                if last in (None, "hundred", "scale"):
                    pass
                elif last == "tens" and kind == "unit" and small > 0:
                    pass  # twenty one
                elif last in ("teen", "tens", "unit_after_tens") and kind in ("teen", "tens") and not has_hundred \
                        and 11 <= cur <= 99 and cur % 10 and total == 0 and last_scale is None:
                    cur, has_hundred = cur * 100, True  # year style: nineteen ninety -> 1990
                else:
                    break
                cur += small
                last = "unit_after_tens" if (last == "tens" and kind == "unit") else kind
                j += 1
                if ordinal:
                    return j, total + cur, True
                continue
            scale, ordinal = (SCALES[w], False) if w in SCALES else (_ORDINAL_SCALES.get(w), True)
            if scale is not None:
                if last in (None, "scale") or cur == 0 or (last == "hundred" and scale == 100):
                    break
                if scale == 100:
                    if has_hundred or cur >= 100:
                        break
                    cur, has_hundred, last = cur * 100, True, "hundred"
                else:
                    if last_scale is not None and scale >= last_scale:
                        break
                    total, cur, has_hundred, last, last_scale = total + cur * scale, 0, False, "scale", scale
                j += 1
                if ordinal:
                    return j, total + cur, True
                continue
            if w == "and" and last in ("hundred", "scale") and j + 1 < n and \
                    (toks[j + 1] in _SMALL or toks[j + 1] in _ORDINAL_SMALL):
                j += 1  # one hundred and five
                continue
            if w == "oh" and last in ("teen", "tens", "unit_after_tens") and not has_hundred and 11 <= cur <= 99 \
                    and cur % 10 and total == 0 and j + 1 < n and 1 <= _SMALL.get(toks[j + 1], 0) <= 9:
                cur, has_hundred, last = cur * 100, True, "hundred"  # nineteen oh five -> 1905
                j += 1
                continue
            break
        if last is None:
            return i, 0, False
        return j, total + cur, False


def words_to_digits(text: str) -> str:
    """Spelled-out numbers -> digits in a lowercase, space-separated string:
    'twenty one' -> '21', 'three hundred and five' -> '305', 'one two three' -> '1 2 3'."""
    return " ".join(_NumberParser(text.split()).run())


# ---------------------------------------------------------------------------------------------
# spellings, contractions
# ---------------------------------------------------------------------------------------------

_SPELLINGS = {
    # British -> American (common words; each listed form is replaced as a whole word)
    "colour": "color", "colours": "colors", "coloured": "colored", "favourite": "favorite",
    "favourites": "favorites", "favour": "favor", "honour": "honor", "honours": "honors",
    "neighbour": "neighbor", "neighbours": "neighbors", "labour": "labor", "behaviour": "behavior",
    "flavour": "flavor", "humour": "humor", "rumour": "rumor", "harbour": "harbor", "armour": "armor",
    "vapour": "vapor", "odour": "odor", "endeavour": "endeavor", "centre": "center", "centres": "centers",
    "metre": "meter", "metres": "meters", "litre": "liter", "litres": "liters", "theatre": "theater",
    "fibre": "fiber", "grey": "gray", "realise": "realize", "realised": "realized", "organise": "organize",
    "organised": "organized", "organisation": "organization", "recognise": "recognize",
    "recognised": "recognized", "apologise": "apologize", "analyse": "analyze", "analysed": "analyzed",
    "travelled": "traveled", "travelling": "traveling", "traveller": "traveler", "cancelled": "canceled",
    "modelling": "modeling", "labelled": "labeled", "jewellery": "jewelry", "aluminium": "aluminum",
    "defence": "defense", "offence": "offense", "licence": "license", "programme": "program",
    "programmes": "programs", "catalogue": "catalog", "dialogue": "dialog", "cheque": "check",
    "tyre": "tire", "tyres": "tires", "plough": "plow", "mould": "mold", "moustache": "mustache",
    "pyjamas": "pajamas", "sceptical": "skeptical", "whilst": "while", "amongst": "among",
    "ok": "okay", "o.k": "okay", "alright": "all right",
    # informal forms and titles
    "gonna": "going to", "wanna": "want to", "gotta": "got to", "gimme": "give me", "lemme": "let me",
    "kinda": "kind of", "sorta": "sort of", "outta": "out of", "dunno": "do not know",
    "mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "prof": "professor", "st": "saint",
    "vs": "versus", "etc": "et cetera",
}

_WHOLE_CONTRACTIONS = {
    "won't": "will not", "can't": "can not", "cannot": "can not", "shan't": "shall not", "ain't": "is not",
    "let's": "let us", "y'all": "you all", "ma'am": "madam", "'cause": "because", "'em": "them",
    "o'clock": "oclock", "i'm": "i am",
}
_IS_WORDS = ("it", "that", "what", "there", "here", "he", "she", "who", "where", "how", "when", "why", "this",
             "everything", "nothing", "something", "everyone", "someone", "nobody")
_SUFFIX_CONTRACTIONS = [(re.compile(r"\b(\w+)n't\b"), r"\1 not"), (re.compile(r"\b(\w+)'re\b"), r"\1 are"),
                        (re.compile(r"\b(\w+)'ll\b"), r"\1 will"), (re.compile(r"\b(\w+)'ve\b"), r"\1 have"),
                        (re.compile(r"\b(\w+)'d\b"), r"\1 would"), (re.compile(r"\b(\w+)'m\b"), r"\1 am"),
                        (re.compile(r"\b(" + "|".join(_IS_WORDS) + r")'s\b"), r"\1 is")]

FILLERS = ("uh", "um", "uhm", "umm", "hmm", "hm", "mm", "mmm", "mhm", "er", "erm", "ah", "eh")

_BRACKETS = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'", "\u00b4": "'",
                         "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})


class EnglishTextNormalizer:
    """Callable: text -> normalised text (lowercase words and digits separated by single spaces).

    numbers: 'digits' (default; spelled numbers become digits), 'words' (digits become words), or None
    (leave numbers as written). remove_fillers: drop 'uh', 'um', 'hmm', ...
    """

    def __init__(self, numbers: str | None = "digits", remove_fillers: bool = True, spellings: bool = True):
        if numbers not in ("digits", "words", None):
            raise ValueError(f"numbers must be 'digits', 'words' or None, got {numbers!r}")
        self.numbers, self.remove_fillers, self.spellings = numbers, remove_fillers, spellings
        self._fillers = re.compile(r"\b(" + "|".join(FILLERS) + r")\b") if remove_fillers else None

    def __call__(self, text: str) -> str:
        s = unicodedata.normalize("NFKC", text or "").translate(_QUOTES).lower()
        s = _BRACKETS.sub(" ", s)
        for short, full in _WHOLE_CONTRACTIONS.items():
            s = re.sub(r"(?<![\w'])" + re.escape(short) + r"(?![\w'])", full, s)
        for pat, rep in _SUFFIX_CONTRACTIONS:
            s = pat.sub(rep, s)
        s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
        s = s.replace("%", " percent ").replace("&", " and ").replace("@", " at ").replace("+", " plus ")
        s = re.sub(r"(?<=\d)\.(?=\d)", "\u0000", s)  # protect decimal points
        s = s.replace("'", "")
        s = re.sub(r"[^\w\u0000]+|_", " ", s)  # every other symbol / punctuation -> space
        s = s.replace("\u0000", ".")
        words = s.split()
        if self.spellings:
            words = " ".join(_SPELLINGS.get(w, w) for w in words).split()
        s = " ".join(words)
        if self._fillers is not None:
            s = self._fillers.sub(" ", s)
        if self.numbers == "digits":
            s = words_to_digits(" ".join(s.split()))
            s = re.sub(r"\b(\d+) (st|nd|rd|th)\b", r"\1\2", s)
        elif self.numbers == "words":
            s = digits_to_words(s)
        return " ".join(s.split())


_DEFAULT = EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Normalise with the default EnglishTextNormalizer (numbers as digits)."""
    return _DEFAULT(text)
