"""Plain text out of MediaWiki markup: enough for training sentences and (title, passage) pairs.

Not a MediaWiki parser. Templates are dropped, not expanded (an infobox or a citation has no
prose worth keeping), except a few inline ones whose text reads as prose (`{{nowrap|...}}`,
`{{lang|fr|...}}`, `{{convert|5|km}}`); another inline template leaves a hole, and a sentence
with a hole ("is located at .") is filtered out;
links keep their visible text; files, categories and interlanguage links go; list items go
(they are fragments, not prose); tables, references, comments and maths go. What survives and
still looks like markup is caught by `looks_clean`, which the callers use as a last filter.

Used by `train.assets` to build the `wiki` asset: `pages(xml_file)` reads articles out of
a dump; the rest are pure functions over strings: `strip_markup(text)`,
`sections(title, text)`, `sentences(paragraph)`, `is_disambiguation(title, text)`, and the
filters `is_sentence(text)` and `looks_clean(text)`.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import IO, Iterator

# Sections whose paragraphs are lists of sources or links, not prose about the title.
SKIPPED_SECTIONS = frozenset({
    "references", "external links", "see also", "notes", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "gallery", "primary sources", "secondary sources",
})

# Inline templates that show their last unnamed parameter as text.
_INLINE_TEMPLATES = frozenset({"nowrap", "nobr", "lang", "small", "smaller", "big", "em", "strong", "sic",
                               "transl", "nowrap begin", "not a typo", "as written", "mvar", "math"})
# Link prefixes whose target is not text: media, categories, interwiki to other projects.
_DROPPED_LINK = re.compile(r"\s*:?\s*(?:file|image|media|category)\s*:", re.I)
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:")  # [[de:Anarchismus]], [[zh-min-nan:...]]
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_EMPTY = re.compile(r"<ref\b[^>]*/>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|$)", re.I | re.S)
# Elements whose content is not prose (maths, code listings, image galleries, timelines).
_DROPPED_ELEMENT = re.compile(
    r"<(math|gallery|source|syntaxhighlight|timeline|imagemap|score|chem|hiero|references)\b[^>]*>"
    r".*?(?:</\1\s*>|$)", re.I | re.S)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
# Innermost first: a construct with no opener of its own kind inside it.
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")  # single [brackets] may sit inside
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^(={1,6})\s*(.+?)\s*\1\s*$", re.M)
_LIST_ITEM = re.compile(r"^[*#;][^\n]*$", re.M)
_INDENT = re.compile(r"^:+\s*", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
# Parentheses a dropped template emptied: "(; born 1815)", "(née Byron; )", "( )".
_PAREN_LEAD = re.compile(r"\((?:\s*[,;:])+\s*")
_PAREN_TRAIL = re.compile(r"(?:\s*[,;:])+\s*\)")
_PAREN_EMPTY = re.compile(r"[ \t]*\(\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]+")

# Sentence ends: . ! ? (and a closing quote or bracket) then space then a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]\u201d\u2019]*)\s+(?=[\"'(\[\u201c\u2018]?[A-Z0-9])")
# A full stop after these is not a sentence end: initials (J. R. R.), titles, short forms.
_ABBREVIATION = re.compile(
    r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|Prof|St|Mt|Jr|Sr|Sen|Rep|Gov|Gen|Col|Lt|Capt|Brig|Maj|Adm|Sgt|Rev|Hon|"
    r"vs|etc|e\.g|i\.e|cf|ca|c|approx|No|Nos|Vol|pp|p|ed|eds|Inc|Ltd|Co|Corp|Bros|Jan|Feb|Mar|Apr|"
    r"Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|U\.K|[A-Z]\.[A-Z]))\.$")
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig\w*|dab|hndis|geodis|[a-z ]*disambiguation)\s*[|}]", re.I)
_WHOLE_SENTENCE = re.compile(r"[\"'(\u201c\u2018]?[A-Z0-9].*[.!?][\"')\u201d\u2019]*$", re.S)
_HOLE = re.compile(r"\s[.,;:)]|\(\s*[,;:)]|\(\s*$")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|<ref|'''|\{\||\|\}|<[a-zA-Z/]|^\s*[|!]|==|__")


def _innermost(pattern: re.Pattern, repl, text: str) -> str:
    """Apply `pattern` until nothing changes: nested constructs go from the inside out."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _template_text(m: re.Match) -> str:
    """The prose a few inline templates stand for; "" for all others (infoboxes, citations...)."""
    name, *args = [a.strip() for a in m.group(0)[2:-2].split("|")]
    args = [a for a in args if "=" not in a]  # named parameters are options, not text
    name = name.lower().replace("_", " ")
    if name in _INLINE_TEMPLATES and args:
        return args[-1]  # {{lang|fr|texte}} -> texte
    if name in ("convert", "cvt") and len(args) >= 2:
        return f"{args[0]} {args[1]}"  # {{convert|5|km|mi}} -> 5 km
    return ""


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if _DROPPED_LINK.match(target) or (not label and _INTERLANGUAGE.match(target)):
        return ""
    if label:
        return label.split("|")[-1]  # [[a|b|c]] shows its last part
    return target.lstrip(":").split("#")[0] or target  # [[#Section]] shows itself


def _remove_blocks(text: str) -> str:
    """Drop what spans lines and nests: comments, references, templates, tables."""
    text = _COMMENT.sub("", text)
    text = _REF_EMPTY.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _innermost(_TEMPLATE, _template_text, text)
    return _innermost(_TABLE, "", text)


def pages(xml_file: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each article in a MediaWiki XML dump; redirects and pages outside
    the article namespace (Wikipedia:, Talk:, ...) are skipped. Streams: memory stays flat."""
    fields: dict[str, str] = {}
    for _, elem in ET.iterparse(xml_file, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]  # the export schema's namespace changes with versions
        if tag in ("title", "ns", "text"):
            fields[tag] = elem.text or ""
        elif tag == "redirect":
            fields["redirect"] = "1"
        elif tag == "page":
            text = fields.get("text", "")
            redirect = "redirect" in fields or text.lstrip()[:9].upper() == "#REDIRECT"
            if fields.get("ns", "0") == "0" and not redirect:
                yield fields.get("title", ""), text
            fields = {}
            elem.clear()


def is_disambiguation(title: str, text: str) -> bool:
    """A page that lists other pages sharing a name: no prose about one thing."""
    return "(disambiguation)" in title.lower() or bool(_DISAMBIGUATION.search(text))


def strip_markup(text: str) -> str:
    """Wikitext -> plain text, one line per source line; headings keep their words.

    Paragraph breaks (blank lines) survive; list items are dropped; `:` indentation is
    removed but the indented text kept.
    """
    text = _remove_blocks(text)
    text = _innermost(_LINK, _link_text, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_ITEM.sub("", text)
    text = _INDENT.sub("", text)
    text = _TAG.sub(lambda m: " " if m.group(0).lower().startswith("<br") else "", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC.sub("", text)
    text = _PAREN_EMPTY.sub("", _PAREN_TRAIL.sub(")", _PAREN_LEAD.sub("(", text)))
    text = html.unescape(text)  # after the tags: an escaped &lt;ref&gt; in prose stays text
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _paragraphs(text: str) -> list[str]:
    """Plain text -> paragraphs: blocks between blank lines, each joined into one line."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def sections(title: str, text: str) -> list[tuple[str, list[str]]]:
    """Wikitext of one article -> [(heading, paragraphs)] in page order.

    The heading is what a reader would search for: the title for the lead section, and
    "Title: Heading" below it, with the innermost heading (a subsection's own, not its
    parent's: "Alabama: Etymology", "Anarchism: Origins"). Sections in SKIPPED_SECTIONS are
    left out with their subsections; so are sections left without paragraphs.
    """
    text = _remove_blocks(text)  # a template may span a heading line; remove it whole first
    out: list[tuple[str, list[str]]] = []
    skip_below = 0  # > 0: inside a skipped section of this level, until a heading at or above it
    pos, heading = 0, title
    for m in [*_HEADING.finditer(text), None]:
        body = text[pos:m.start()] if m else text[pos:]
        if not skip_below:
            paragraphs = _paragraphs(strip_markup(body))
            if paragraphs:
                out.append((heading, paragraphs))
        if m is None:
            break
        level = len(m.group(1))
        name = strip_markup(m.group(2))
        heading = f"{title}: {name}" if name else title
        if skip_below and level <= skip_below:
            skip_below = 0
        if not skip_below and name.lower().rstrip(":") in SKIPPED_SECTIONS:
            skip_below = level
        pos = m.end()
    return out


def sentences(paragraph: str) -> list[str]:
    """Split one paragraph of plain text into sentences with a regex (no model, no data)."""
    pieces = _SENTENCE_END.split(paragraph.strip())
    # split() with one group alternates [text, closer, text, ...]: the closer ends the text before.
    raw = [pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else "") for i in range(0, len(pieces), 2)]
    out: list[str] = []
    for piece in raw:
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


def is_sentence(text: str) -> bool:
    """A whole, clean sentence: starts with a capital, digit or quote, ends with . ! or ?,
    balanced quotes and brackets, and `looks_clean`."""
    return (bool(_WHOLE_SENTENCE.match(text)) and text.count('"') % 2 == 0
            and text.count("(") == text.count(")") and looks_clean(text))


def looks_clean(text: str) -> bool:
    """False when markup survived stripping (unbalanced or unusual constructs), or when a
    dropped template left a hole ("is located at .", "set at )")."""
    return not _LEFTOVER.search(text) and not _HOLE.search(text)
