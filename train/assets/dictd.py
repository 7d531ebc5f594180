"""Dictionary entries out of a dictd database (GCIDE): (headword, one clean definition) pairs.

A dictd database is two files: `NAME.index`, lines `headword<TAB>offset<TAB>length` with the
numbers in dictd's base64 digits, and `NAME.dict.dz`, the entries as text, gzip-compressed
(dictzip is gzip with a seek table, so `gzip` reads it). Several index lines may point at one
entry (inflected forms, sub-entries), so entries are read once per (offset, length).

A GCIDE entry starts with a header, `Apple \\Ap"ple\\ ([a^]p"p'l), n. [OE. appel ...]`
(headword, syllables, pronunciation, part of speech, etymology in brackets), then numbered
senses, each closed by a source tag such as `[1913 Webster]`, then notes, quotations
(`--Shak.`), synonyms and run-in sub-entries. `clean_entry` keeps the headword and the first
sense that says more than "see {X}", as plain text. Used by `train.assets` to build the `gcide` asset.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterator

_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DIGIT_VALUE = {c: i for i, c in enumerate(_DIGITS)}

# GCIDE writes letters outside ASCII as bracketed codes: [ae], ['e], [=a], [aum], [deg] ...
_NAMED_CHARS = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "aum": "ä", "eum": "ë", "ium": "ï", "oum": "ö",
    "uum": "ü", "imac": "ī", "eth": "ð", "thorn": "þ", "deg": "°", "sect": "§", "pounds": "£",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "theta": "θ", "iota": "ι",
    "pi": "π", "phi": "φ", "tau": "τ", "mu": "μ", "root": "√", "frac12": "½", "frac14": "¼",
}
# Accent marks before a letter (['e] = é); marks GCIDE uses only in pronunciations map to none.
_ACCENTS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", ",": "\u0327", "^": "\u0302",
            "=": "\u0304", ".": "", "-": "", "*": ""}
_CHAR_CODE = re.compile(r"\[(?:([a-zA-Z]+\d*)|([`'\"~,^=.*-])([a-zA-Z]{1,2})|([a-zA-Z]{1,2})\^)\]")
# Tags that close a sense: where the text came from.
_SOURCE = re.compile(r"\[[^\[\]]*(?:Webster|WordNet|PJC|Century|RDH|RHUD)[^\[\]]*\]")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")  # etymology, usage labels ([Obs.], [Colloq.]), sources
_BRACES = re.compile(r"\{([^{}]*)\}")  # {Canis}: italics and cross-references alike
_ATTRIBUTION = re.compile(r"\s--\s?(?=[A-Z])|\s--$")  # "... bear apples. --Holland." (not " -- called")
_PARAGRAPH_END = re.compile(r"\n\s*\n|\n\s*(?:Note|Syn|Usage|See also)\b\s*:?")
# What may stand between the pronunciation and the definition: part of speech, labels.
_HEADER_ITEM = re.compile(r"(?:pl|sing)\.(?:[\s,;]*(?:or|[A-Z][a-z]?\.)?\s*\{[^{}]*\})+"  # pl. {Oxen}
                          r"|\s+|[,;.&]|\([^()]*\)|[a-z]{1,7}\.(?=[\s,;\[(]|$)")
_FIELD = re.compile(r"^(?:\([A-Za-z][\w.,& ]{1,30}\)\s*)+")  # (Zool.), (Naut. & Mech.); not (a)
_SENSE_NUMBER = re.compile(r"^\d{1,2}\.\s+")
# A derived word run in after the sense: "... an effect. Co`ef*fi"cient*ly, adv." or "-- v. t. To prick"
_RUN_IN_FORM = re.compile(r"\s--\s*\{?[A-Za-z]+[`*\"]|\s\{?[A-Za-z]+[`*][^\s,]*\}?,\s*[a-z]{1,5}\."
                          r"|\s--\s*[a-z]{1,5}\.\s")
_DANGLING = re.compile(r"(?:[;,:]\s*|\s)(?:such as|same as|as)[,:]?$")  # "to feel; as:" before cut examples
# Marks that say the cleaning went wrong: stray brackets, "?" or "()" where GCIDE lacked a letter,
# a syllabified word (Co`ef*fi"cient) or a part of speech left from the header.
_DEBRIS = re.compile(r"[\[\]{}\\<>]|\?(?=[\w.,;)])|\(\s*\)|\w\*\w|^--|^[a-z]{1,5}\.[.:]")
_TRAILING_QUOTE = re.compile(r'(?<=[.;:!?])\s*"[^"]*"\s*$')  # an illustrative quotation after the sense
# A cross-reference only: "Same as {Weir}.", "See {Bell jar}.", "pl. of {Ox}", "imp. of {Run}."
_XREF_WORDS = re.compile(
    r"\b(?:same|as|see|also|under|of|alt|obs|pl|imp|p|pr|vb|n|sing|variant|var|form|spelling|"
    r"and|or|the|a|an|&)\b|[.,;:()&]", re.I)


def number(digits: str) -> int:
    """A dictd base64 number: "BZ0" -> 1*64*64 + 25*64 + 52."""
    value = 0
    for c in digits:
        value = value * 64 + _DIGIT_VALUE[c]
    return value


def read_index(text: str) -> list[tuple[str, int, int]]:
    """[(headword, offset, length)] from the text of a `.index` file."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            out.append((parts[0], number(parts[1]), number(parts[2])))
    return out


def _decode(raw: bytes) -> str:
    # The GCIDE file is UTF-8 but for a few entries in Windows-1252 (curly quotes, cedillas).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def entries(index_text: str, data: bytes) -> Iterator[str]:
    """The text of each entry once, in file order; dictd's own `00-database-*` entries left out."""
    seen = set()
    for headword, offset, length in sorted(read_index(index_text), key=lambda e: e[1]):
        if (offset, length) in seen or headword.startswith("00-"):
            continue
        seen.add((offset, length))
        yield _decode(data[offset:offset + length])


def _char(m: re.Match) -> str:
    name, mark, letters, breve = m.groups()
    if name is not None:
        return _NAMED_CHARS.get(name, m.group(0))  # not a code: a bracket the caller removes
    if breve is not None:
        return breve
    return unicodedata.normalize("NFC", letters[0] + _ACCENTS[mark]) + letters[1:]


def replace_char_codes(text: str) -> str:
    """GCIDE's bracketed letters as Unicode: "caf['e]" -> "café", "H[ae]matopinus" -> "Hæmatopinus"."""
    return _CHAR_CODE.sub(_char, text)


def _matching_bracket(text: str) -> int:
    """Index just past the `]` closing the `[` at text[0] (or the end, when it never closes)."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if depth == 0:
            return i + 1
    return len(text)


def _strip_header(text: str) -> str:
    """Drop `Headword \\Syl"la*bles\\ (pron), pos.; pl. {Forms}. [etym.] (Field)` from the start."""
    first_paragraph = text.find("\n\n") if "\n\n" in text else len(text)
    pos = text.rfind("\\", 0, first_paragraph) + 1  # the last syllable marker ends the headwords
    if pos == 0:
        return ""
    while pos < len(text):
        m = _HEADER_ITEM.match(text, pos)
        if m:
            pos = m.end()
        elif text[pos] == "[":  # the etymology may hold anything, nested brackets included
            pos += _matching_bracket(text[pos:])
        else:
            break
    return text[pos:]


def _senses(body: str) -> list[str]:
    """Candidate definitions in order: each numbered sense (or the one unnumbered definition),
    each lettered sub-sense split out; run-in sub-entries, notes and quotations left out."""
    body = re.sub(r"^(?:\s*" + _SOURCE.pattern + ")+", "", body).strip()  # a tag right after the header
    if _SENSE_NUMBER.match(body):
        chunks = re.split(r"\n\s*(?=\d{1,2}\.\s)", body)
        chunks = [c for c in chunks if _SENSE_NUMBER.match(c.strip())]
    else:
        chunks = [body]
    out = []
    for chunk in chunks:
        chunk = _SOURCE.split(chunk, maxsplit=1)[0]
        chunk = _PARAGRAPH_END.split(chunk, maxsplit=1)[0]
        chunk = _FIELD.sub("", _SENSE_NUMBER.sub("", chunk.strip()))  # "1. (Zool.) A quadruped ..."
        for part in re.split(r"(?:^|\n)\s*\([a-z]\)\s+", chunk):  # "(a) A grappling iron ... (b) ..."
            part = _ATTRIBUTION.split(part, maxsplit=1)[0].strip()
            if part:
                out.append(part)
    return out


def _is_cross_reference(definition: str) -> bool:
    """True for "See ..." and "Same as ...", and when nothing but such words remain once the
    referenced words are taken out ("pl. of {Ox}", "imp. of {Run}")."""
    return bool(re.match(r"\s*(?:see|same as)\b", definition, re.I)) or \
        not re.search(r"[A-Za-z]{2,}", _XREF_WORDS.sub(" ", _BRACES.sub(" ", definition)))


def _plain(definition: str) -> str:
    """A sense without brackets and braces, on one line; "" when it only refers elsewhere."""
    while _BRACKETS.search(definition):  # usage labels: [Obs.], [Colloq.], [R.]
        definition = _BRACKETS.sub("", definition)
    if _is_cross_reference(definition):
        return ""
    definition = _RUN_IN_FORM.split(definition, maxsplit=1)[0]
    while _BRACES.search(definition):  # {{Sauropterygia}} happens
        definition = _BRACES.sub(r"\1", definition)
    definition = _TRAILING_QUOTE.sub("", definition)
    definition = " ".join(definition.split())
    definition = re.sub(r"\s+([,.;:])", r"\1", definition)
    definition = _DANGLING.sub("", definition).strip(" ;,:")
    definition = re.sub(r"\.\.$", ".", definition)
    return "" if _DEBRIS.search(definition) else definition


def clean_entry(text: str) -> tuple[str, str] | None:
    """An entry's text -> (headword, its first definition that is more than a cross-reference,
    as plain text), or None when there is none."""
    text = replace_char_codes(text.lstrip("\n"))
    first_line = text.split("\n", 1)[0]
    if "\\" not in first_line:
        return None
    headword = " ".join(first_line.split("\\", 1)[0].split())
    for sense in _senses(_strip_header(text)):
        definition = _plain(sense)
        if headword and definition:
            return headword, definition
    return None
