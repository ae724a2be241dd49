#!/usr/bin/env python3
"""Turn a MediaWiki XML dump into plain-text articles, one UTF-8 file per article.

Used by scripts/fetch_demo_data.sh for the demo's `prose/` set: the shortened English Wikipedia dump that
gensim ships as test data (gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2,
early 2016, text under CC BY-SA 3.0 and the GFDL).

Standard library only, and deterministic: the same dump gives byte-identical files on any Python 3.8+.

Which pages: main namespace (<ns>0</ns>) only; no redirects, no disambiguation pages, no "List of ..." pages, none
named by --exclude, and none whose text is under --min-chars characters once converted. Each kept page becomes
<out-dir>/<Title>.txt (the title with every run of characters other than ASCII letters and digits made one "_"; a
clash is an error). The file holds the title, a blank line, then the article: paragraphs (one line each; the items of
a kept list one line each) and section headings, separated by blank lines, ending in one newline.

What the conversion does, in this order:
  * drops comments, <ref> notes, and the contents of <math>, <gallery>, <source>, <syntaxhighlight>, <pre>,
    <timeline>, <imagemap>, <score>, <templatedata> and <references>;
  * expands templates innermost first: a few that stand for running text keep it ({{convert|5|km}} -> "5 km",
    {{lang|fr|mot}} -> "mot", {{nihongo|English|...}} -> "English", {{nowrap|...}}, {{as of|2015}} -> "As of 2015",
    and so on, see _template below); every other template (infoboxes, citations, navigation boxes, pronunciation,
    maintenance tags) is dropped;
  * drops tables ({| ... |}), files, images, categories and interlanguage links; keeps the shown text of internal
    links ([[target|text]] -> "text") and of external links ([http://... text] -> "text");
  * drops the sections that are not prose (References, Notes, See also, External links, Further reading,
    Bibliography, Sources, ...) with their subsections, keeps other headings as their own paragraph;
  * drops runs of three or more short list items (average under 80 characters: filmographies, taxonomies, lists
    of works), and headings left with no text under them;
  * removes bold/italic quotes, list and indentation markers, the remaining HTML tags (keeping their text),
    magic words; decodes HTML entities; turns non-breaking and other odd spaces into plain spaces; tidies the
    spaces and empty brackets that dropped notes and templates leave behind.

    python3 wiki_to_text.py DUMP.xml[.bz2] --out-dir DIR [--min-chars N] [--exclude TITLE]...
"""

import argparse
import bz2
import html
import os
import re
import sys
import xml.etree.ElementTree as ET

# Sections dropped with their subsections (compared lower-cased).
DROP_SECTIONS = {
    "references", "notes", "footnotes", "see also", "external links", "further reading", "bibliography",
    "sources", "citations", "works cited", "notes and references", "references and notes", "primary sources",
    "secondary sources", "general references", "specific references", "external links and references",
    "references and further reading", "other", "gallery", "explanatory notes", "cited sources", "literature",
    "notes and sources", "sources and further reading", "online sources", "further reading and external links",
}

# Namespaces (and interwiki prefixes) whose links are dropped with their text.
DROP_LINK_PREFIXES = {"file", "image", "category", "media", "wikipedia", "wp", "template", "help", "portal", "user",
                      "talk", "special", "book", "draft", "module", "mediawiki", "timedtext"}

WS = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


def _args(inner):
    """Split a template body (already free of nested templates) into name, positional and named arguments."""
    # Pipes inside links belong to the link, not to the template.
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(inner):
        two = inner[i:i + 2]
        if two == "[[":
            depth += 1
            cur.append(two)
            i += 2
            continue
        if two == "]]" and depth:
            depth -= 1
            cur.append(two)
            i += 2
            continue
        c = inner[i]
        if c == "|" and not depth:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    name = parts[0].strip().lower().replace("_", " ")
    name = re.sub(r"\s+", " ", name)
    pos, named = [], {}
    for p in parts[1:]:
        m = re.match(r"\s*([A-Za-z0-9 _-]+?)\s*=(.*)$", p, re.S)
        if m:
            named[m.group(1).strip().lower()] = m.group(2).strip()
        else:
            pos.append(p.strip())
    return name, pos, named


CONVERT_JOINERS = {"to", "-", "–", "and", "or", "by", "x", "×", "+/-", "±", "and(-)", "or(-)", "to(-)"}


def _convert(pos):
    out, i = [], 0
    if not pos:
        return ""
    out.append(pos[0])
    i = 1
    while i + 1 < len(pos) and pos[i] in CONVERT_JOINERS:
        out.append(pos[i].replace("(-)", ""))
        out.append(pos[i + 1])
        i += 2
    if i < len(pos):
        unit = pos[i]
        unit = {"C": "°C", "F": "°F", "sqmi": "sq mi", "sqkm": "km2", "km2": "km2", "acre": "acres",
                "ha": "hectares", "ft2": "sq ft", "m2": "m2"}.get(unit, unit)
        out.append(unit)
    return " ".join(out)


def _first(pos, named=None, key=None):
    if key and named and key in named:
        return named[key]
    return pos[0] if pos else ""


def _template(match):
    name, pos, named = _args(match.group(1))
    if name.startswith("lang-"):                       # {{lang-fr|text}}
        return _first(pos)
    if name in ("convert", "cvt"):
        return _convert(pos)
    if name in ("lang", "transl", "transliteration"):  # {{lang|code|text}}, {{transl|code|[scheme|]text}}
        return pos[-1] if len(pos) >= 2 else ""
    if name in ("nowrap", "nobr", "small", "smaller", "big", "larger", "sc", "smallcaps", "em", "strong", "vr",
                "nts", "ntsh", "nihongo", "nihongo2", "nowiki", "keypress", "angbr", "not a typo", "sic",
                "linktext", "mvar", "var", "math", "tooltip", "abbr", "gloss", "lang2", "wikt-lang", "nq",
                "script", "rtl-lang", "transl2", "avoid wrap", "smallcaps all", "midsize", "resize", "val", "lit",
                "literal translation", "ship", "sclass", "usni", "uss", "hms", "hmas"):
        if name == "resize" and len(pos) >= 2:
            return pos[1]
        if name in ("ship",) and len(pos) >= 2:
            return " ".join(pos[:2])
        if name in ("uss", "hms", "hmas"):
            return name.upper() + (" " + pos[0] if pos else "")
        if name in ("lit", "literal translation"):
            return "lit. " + ", ".join('"%s"' % p for p in pos) if pos else ""
        return _first(pos)
    if name in ("quote", "quotation", "cquote", "blockquote", "poemquote", "bq"):
        return "\n\n" + _first(pos, named, "text") + "\n\n"
    if name in ("as of",):
        return "As of " + " ".join(pos[:3])
    if name in ("dts", "date"):
        return " ".join(p for p in pos if not re.match(r"^(format|link|abbr)", p))
    if name in ("birth date", "death date", "birth date and age", "death date and age", "start date",
                "end date", "birth year and age", "death year and age"):
        nums = [p for p in pos if re.fullmatch(r"\d{1,4}", p)]
        return "-".join(nums[:3])
    if name in ("frac", "sfrac"):
        if len(pos) == 1:
            return "1/" + pos[0]
        return "/".join(pos) if len(pos) < 3 else "%s %s/%s" % tuple(pos[:3])
    if name in ("chem",):
        return "".join(pos)
    if name in ("!",):
        return "|"
    if name in ("pipe",):
        return "|"
    if name in ("·", "dot", "middot", "•", "bull", "spaced ndash", "snd", "ndash", "mdash", "spaced en dash"):
        return {"·": " · ", "dot": " · ", "middot": " · ", "•": " • ", "bull": " • ", "ndash": "–",
                "mdash": "—"}.get(name, " – ")
    if name in ("nbsp", "spaces", "space"):
        return " "
    if name in ("'s",):
        return "'s"
    if name in ("'",):
        return "'"
    if name in ("flag", "flagcountry", "flagu"):
        return _first(pos)
    if name in ("okina",):
        return "ʻ"
    if name in ("circa", "c.", "c"):
        return "c. " + _first(pos)
    if name in ("floruit", "fl."):
        return "fl. " + _first(pos)
    if name in ("reign", "r."):
        return "r. " + "–".join(pos[:2])
    if name in ("bc", "bce"):
        return _first(pos) + " BC"
    if name in ("ad", "ce"):
        return "AD " + _first(pos)
    if name in ("us$", "usd"):
        return "US$" + _first(pos)
    if name in ("gbp", "£"):
        return "£" + _first(pos)
    if name in ("inflation", "formatprice", "format price"):
        return ""
    return ""


def _strip_templates(text):
    inner = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.S)
    while True:
        new = inner.sub(_template, text)
        if new == text:
            break
        text = new
    # Unbalanced leftovers.
    return text.replace("{{", "").replace("}}", "")


def _strip_tables(text):
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip(" :")
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _link(match):
    body = match.group(1)
    target, _, shown = body.partition("|")
    t = target.strip()
    lead_colon = t.startswith(":")
    t = t.lstrip(":").strip()
    prefix, colon, _ = t.partition(":")
    p = prefix.strip().lower()
    if colon and not lead_colon:
        if p in DROP_LINK_PREFIXES:
            return ""
        # Interlanguage links: [[fr:Titre]], [[simple:Title]], [[zh-min-nan:...]].
        if re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*|simple", p) and not shown:
            return ""
    if colon and p in ("file", "image", "media", "category"):
        return shown if shown else ""
    if shown:
        # [[File:...|thumb|caption]] never gets here; a pipe trick [[Foo (bar)|]] shows "Foo".
        return shown.split("|")[-1]
    t = re.sub(r"^(wikt|wiktionary|w|s|wikisource|q|wikiquote|b|wikibooks|n|wikinews|v|commons|meta|m|"
               r"species|wikispecies|d|wikidata|c|voy|wikiversity|wikivoyage|mw):", "", t, flags=re.I)
    return t.split("#")[0] if not t.startswith("#") else t[1:]


def _strip_links(text):
    inner = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
    while True:
        new = inner.sub(_link, text)
        if new == text:
            break
        text = new
    # External links: [http://x text] -> text; [http://x] -> ''.
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\]", "", text)
    text = re.sub(r"(?<![\w/])(?:https?|ftp)://[^\s<>\]]+", "", text)
    return text


def _drop_sections(text):
    out, drop_level = [], 0
    for line in text.split("\n"):
        m = re.match(r"^(={2,6})\s*(.*?)\s*\1\s*$", line)
        if m:
            level = len(m.group(1))
            title = m.group(2).strip()
            if drop_level and level > drop_level:
                continue
            drop_level = 0
            if title.lower().rstrip(":") in DROP_SECTIONS:
                drop_level = level
                continue
            out.append("\n\x00%d\x00%s\n" % (level, title))
            continue
        if not drop_level:
            out.append(line)
    return "\n".join(out)


def convert(wikitext):
    t = wikitext.replace("\r\n", "\n").replace("\r", "\n")
    t = re.sub(r"<!--.*?(-->|$)", "", t, flags=re.S)
    t = re.sub(r"<ref\b[^>]*/\s*>", "", t, flags=re.I)
    t = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", t, flags=re.I | re.S)
    for tag in ("math", "gallery", "source", "syntaxhighlight", "pre", "timeline", "imagemap", "score",
                "templatedata", "references", "chem", "ce", "hiero", "graph", "mapframe", "categorytree"):
        t = re.sub(r"<%s\b[^>]*/\s*>" % tag, "", t, flags=re.I)
        t = re.sub(r"<%s\b[^>]*>.*?</%s\s*>" % (tag, tag), "", t, flags=re.I | re.S)
    t = _strip_templates(t)
    t = _strip_tables(t)
    t = _strip_links(t)
    t = _drop_sections(t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<br\s*/?\s*>", "\n", t, flags=re.I)
    t = re.sub(r"</?(?:[a-zA-Z][a-zA-Z0-9]*)\b[^<>]*>", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = html.unescape(t)
    t = t.replace("\u200b", "").replace("\ufeff", "").replace("\u00ad", "")

    paras, cur = [], []   # paragraphs as (heading level or 0, text); cur: lines as (list item?, text)

    def flush():
        # Runs of 3 or more short list items (filmographies, taxonomies, lists of works) are not prose: dropped.
        lines, i = [], 0
        while i < len(cur):
            j = i
            while j < len(cur) and cur[j][0]:
                j += 1
            if j > i:
                run = cur[i:j]
                if not (len(run) >= 3 and sum(len(s) for _, s in run) < 80 * len(run)):
                    lines.extend(run)
                i = j
            else:
                lines.append(cur[i])
                i += 1
        if lines:
            text = lines[0][1]
            for (was_item, _), (item, s) in zip(lines, lines[1:]):
                text += ("\n" if was_item or item else " ") + s
            paras.append((0, text))
        del cur[:]

    for line in t.split("\n"):
        m = re.match(r"^\x00(\d)\x00(.*)$", line)
        level = 0
        if m:
            flush()
            level, line = int(m.group(1)), m.group(2)
        s = line.strip()
        if re.fullmatch(r"-{4,}", s):
            s = ""
        item = bool(re.match(r"[*#]", s))
        s = re.sub(r"^[*#:;]+\s*", "", s)
        s = WS.sub(" ", s).strip()
        # Leftovers of dropped notes and templates.
        s = re.sub(r"\(\s*(?:[,;:]\s*)*\)", "", s)
        s = re.sub(r"\(\s*(?:[,;]\s*)+", "(", s)
        s = re.sub(r"(?:\s*[,;])+\s*\)", ")", s)
        s = re.sub(r" +([,.;:!?)])", r"\1", s)
        s = re.sub(r"\( +", "(", s)
        s = re.sub(r",(?=[,.])", "", s)
        s = WS.sub(" ", s).strip()
        if not s or not re.search(r"[A-Za-z0-9]", s):
            flush()
            continue
        if level:
            paras.append((level, s))
        else:
            cur.append((item, s))
    flush()
    # Headings with no text before the next heading of the same or a higher level (or the end).
    keep = []
    for i, (level, s) in enumerate(paras):
        if level:
            has_text = False
            for lv, _ in paras[i + 1:]:
                if lv and lv <= level:
                    break
                if not lv:
                    has_text = True
                    break
            if not has_text:
                continue
        keep.append(s)
    return "\n\n".join(keep)


def file_name(title):
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_") + ".txt"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump", help="MediaWiki XML export, plain or .bz2")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--min-chars", type=int, default=1500,
                    help="drop articles shorter than this once converted (default 1500)")
    ap.add_argument("--exclude", action="append", default=[], metavar="TITLE",
                    help="leave out the article with this exact title (repeatable)")
    a = ap.parse_args()

    opener = bz2.open if a.dump.endswith(".bz2") else open
    os.makedirs(a.out_dir, exist_ok=True)
    written, skipped, names = 0, 0, set()
    with opener(a.dump, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {c.tag.rsplit("}", 1)[-1]: c for c in el}
            title = fields["title"].text or ""
            ns = fields["ns"].text if "ns" in fields else "0"
            text = ""
            rev = fields.get("revision")
            if rev is not None:
                for c in rev:
                    if c.tag.rsplit("}", 1)[-1] == "text":
                        text = c.text or ""
            el.clear()
            low = text.lstrip().lower()
            if (ns != "0" or "redirect" in fields or low.startswith("#redirect")
                    or title in a.exclude or title.endswith("(disambiguation)") or title.startswith("List of ")
                    or re.search(r"\{\{\s*(disambig|disambiguation|dab|hndis|geodis)\s*(\||\}\})", low)):
                skipped += 1
                continue
            body = convert(text)
            if len(body) < a.min_chars:
                skipped += 1
                continue
            name = file_name(title)
            if name in names:
                sys.exit("wiki_to_text: two articles map to the file name %s" % name)
            names.add(name)
            with open(os.path.join(a.out_dir, name), "w", encoding="utf-8", newline="\n") as out:
                out.write(title + "\n\n" + body + "\n")
            written += 1
    print("wiki_to_text: wrote %d articles to %s (%d pages skipped)" % (written, a.out_dir, skipped),
          file=sys.stderr)


if __name__ == "__main__":
    main()
