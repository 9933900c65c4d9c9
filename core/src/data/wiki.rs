//! The English Wikipedia sample that gensim ships (a MediaWiki XML export, bz2): articles with
//! the wiki markup stripped the way WikiText is made (templates, references, tables and files
//! dropped; links replaced by their text; `== Heading ==` lines kept), split by article into a
//! calibration half and an evaluation half.

use std::io::BufReader;
use std::path::Path;

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::error::{Error, Result};

/// Name under which perplexity on the evaluation half is reported (it is not WikiText-2).
pub const WIKI_NAME: &str = "wiki-2016";

#[derive(Debug, Clone)]
pub struct Article {
    pub title: String,
    pub text: String,
}

/// The articles of a MediaWiki export (`.xml` or `.xml.bz2`): namespace 0, no redirects,
/// markup stripped, in file order.
pub fn read_articles(path: &Path) -> Result<Vec<Article>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn std::io::Read> = if path.extension().is_some_and(|e| e == "bz2") {
        Box::new(bzip2::read::MultiBzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut xml = Reader::from_reader(BufReader::new(reader));
    let mut buf = Vec::new();
    let (mut title, mut ns, mut text) = (String::new(), String::new(), String::new());
    let mut field: Option<&'static str> = None;
    let mut out = Vec::new();
    loop {
        let ev = xml.read_event_into(&mut buf).map_err(|e| {
            Error::format(
                path,
                format!("XML error at byte {}: {e}", xml.buffer_position()),
            )
        })?;
        match ev {
            Event::Start(e) => {
                field = match e.name().as_ref() {
                    b"page" => {
                        title.clear();
                        ns.clear();
                        text.clear();
                        None
                    }
                    b"title" => Some("title"),
                    b"ns" => Some("ns"),
                    b"text" => Some("text"),
                    _ => None,
                }
            }
            Event::Text(t) => {
                let s = t
                    .decode()
                    .map_err(|e| Error::format(path, format!("bad text: {e}")))?;
                let s = quick_xml::escape::unescape(&s)
                    .map_err(|e| Error::format(path, format!("bad entity: {e}")))?;
                match field {
                    Some("title") => title.push_str(&s),
                    Some("ns") => ns.push_str(&s),
                    Some("text") => text.push_str(&s),
                    _ => {}
                }
            }
            Event::GeneralRef(r) => {
                // Entities such as &amp; arrive separately; resolve the XML ones.
                let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                let c = match name.as_str() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                };
                if field == Some("text") {
                    text.push_str(c);
                } else if field == Some("title") {
                    title.push_str(c);
                }
            }
            Event::End(e) => {
                if e.name().as_ref() == b"page" && ns.trim() == "0" {
                    let is_redirect = text
                        .trim_start()
                        .to_ascii_uppercase()
                        .starts_with("#REDIRECT");
                    if !is_redirect {
                        let clean = strip_markup(&text);
                        if !clean.trim().is_empty() {
                            out.push(Article {
                                title: title.clone(),
                                text: clean,
                            });
                        }
                    }
                }
                field = None;
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if out.is_empty() {
        return Err(Error::format(
            path,
            "no articles found in this MediaWiki export",
        ));
    }
    Ok(out)
}

/// Calibration and evaluation text: articles alternate between the two halves (even index →
/// calibration, odd → evaluation), each half joined with blank lines.
pub struct WikiSplit {
    pub calibration: String,
    pub evaluation: String,
}

pub fn split(articles: &[Article]) -> WikiSplit {
    let half = |parity: usize| {
        articles
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, a)| format!("= {} =\n\n{}", a.title, a.text))
            .collect::<Vec<_>>()
            .join("\n\n")
    };
    WikiSplit {
        calibration: half(0),
        evaluation: half(1),
    }
}

/// Strip wiki markup from an article's source.
pub fn strip_markup(src: &str) -> String {
    let s = remove_between(src, "<!--", "-->");
    let s = remove_nested(&s, "{{", "}}");
    let s = remove_nested(&s, "{|", "|}");
    let s = remove_tag_blocks(
        &s,
        &[
            "ref", "math", "gallery", "timeline", "imagemap", "score", "chem",
        ],
    );
    let s = replace_links(&s);
    let s = remove_tags(&s);
    let s = replace_external_links(&s);
    let s = s.replace("'''", "").replace("''", "");
    let s = decode_entities(&s);
    tidy_lines(&s)
}

fn remove_between(s: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(open) {
        out.push_str(&rest[..i]);
        match rest[i + open.len()..].find(close) {
            Some(j) => rest = &rest[i + open.len() + j + close.len()..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Remove `open … close` spans, counting nesting (templates inside templates).
fn remove_nested(s: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with(open) {
            depth += 1;
            i += open.len();
        } else if depth > 0 && rest.starts_with(close) {
            depth -= 1;
            i += close.len();
        } else {
            let c = rest.chars().next().expect("non-empty");
            if depth == 0 {
                out.push(c);
            }
            i += c.len_utf8();
        }
    }
    out
}

/// Remove `<tag …>…</tag>` and `<tag …/>` for the named tags, case-insensitively.
fn remove_tag_blocks(s: &str, tags: &[&str]) -> String {
    let mut s = s.to_string();
    for tag in tags {
        let mut out = String::with_capacity(s.len());
        let lower = s.to_ascii_lowercase();
        let open = format!("<{tag}");
        let close = format!("</{tag}>");
        let mut i = 0;
        while let Some(j) = lower[i..].find(&open) {
            let start = i + j;
            let after = lower.as_bytes().get(start + open.len()).copied();
            // `<reference>` is not `<ref>`.
            if !matches!(after, Some(b' ' | b'>' | b'/' | b'\t' | b'\n')) {
                out.push_str(&s[i..start + open.len()]);
                i = start + open.len();
                continue;
            }
            out.push_str(&s[i..start]);
            let Some(gt) = lower[start..].find('>') else {
                i = s.len();
                break;
            };
            let tag_end = start + gt + 1;
            if lower[..tag_end].ends_with("/>") {
                i = tag_end;
            } else {
                i = match lower[tag_end..].find(&close) {
                    Some(k) => tag_end + k + close.len(),
                    None => s.len(),
                };
            }
        }
        out.push_str(&s[i.min(s.len())..]);
        s = out;
    }
    s
}

/// Remove any remaining HTML-like tag, keeping what is between tags.
fn remove_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let is_tag = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/');
        match (is_tag, after.find('>')) {
            (true, Some(j)) if !after[..j].contains('\n') => rest = &after[j + 1..],
            _ => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `[[target|text]]` → text, `[[target]]` → target; files, images, categories and
/// interlanguage links are dropped whole (captions included).
fn replace_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with("[[") {
            let Some(len) = matching_close(rest) else {
                out.push_str(rest);
                break;
            };
            let inner = &rest[2..len - 2];
            out.push_str(&link_text(inner));
            i += len;
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Length of `[[ … ]]` at the start of `s`, counting nested links.
fn matching_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'[' && b[i + 1] == b'[' {
            depth += 1;
            i += 2;
        } else if b[i] == b']' && b[i + 1] == b']' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

fn link_text(inner: &str) -> String {
    let target = inner.split('|').next().unwrap_or("").trim();
    if let Some((prefix, _)) = target.split_once(':') {
        let p = prefix.trim().to_ascii_lowercase();
        let dropped = ["file", "image", "category", "media"].contains(&p.as_str())
            // Interlanguage links: [[fr:…]], [[simple:…]], [[zh-min-nan:…]].
            || (p.len() <= 12 && p.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !p.is_empty() && prefix == prefix.to_ascii_lowercase() && !target.starts_with(':'));
        if dropped {
            return String::new();
        }
    }
    // The shown text is after the last top-level '|'.
    let mut depth = 0;
    let mut last_bar = None;
    let b = inner.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'[' => depth += 1,
            b']' => depth -= 1,
            b'|' if depth == 0 => last_bar = Some(i),
            _ => {}
        }
    }
    let shown = match last_bar {
        Some(i) => &inner[i + 1..],
        None => inner.trim_start_matches(':'),
    };
    replace_links(shown)
}

/// `[http://… text]` → text; a bare `[http://…]` disappears.
fn replace_external_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let is_url = ["http://", "https://", "ftp://", "//"]
            .iter()
            .any(|p| after.starts_with(p));
        match (is_url, after.find(']')) {
            (true, Some(j)) => {
                if let Some((_, text)) = after[..j].split_once(' ') {
                    out.push_str(text.trim());
                }
                rest = &after[j + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entities(s: &str) -> String {
    const ENTITIES: &[(&str, &str)] = &[
        ("&nbsp;", " "),
        ("&ndash;", "–"),
        ("&mdash;", "—"),
        ("&minus;", "−"),
        ("&times;", "×"),
        ("&quot;", "\""),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&amp;", "&"),
    ];
    let mut s = s.to_string();
    for (e, r) in ENTITIES {
        if s.contains(e) {
            s = s.replace(e, r);
        }
    }
    s
}

/// Normalise lines: headings as `== Title ==`, list markers removed, table and empty leftovers
/// dropped, runs of spaces collapsed; paragraphs separated by one newline.
fn tidy_lines(s: &str) -> String {
    let mut lines = Vec::new();
    for line in s.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('|') || t.starts_with('!') || t.starts_with("__") {
            continue;
        }
        let level = t.chars().take_while(|&c| c == '=').count();
        let line = if level >= 2 && t.ends_with(&"=".repeat(level)) && t.len() > 2 * level {
            let title = t[level..t.len() - level].trim();
            if title.is_empty() {
                continue;
            }
            let marks = "=".repeat(level);
            format!("{marks} {title} {marks}")
        } else {
            let body = t.trim_start_matches(['*', '#', ':', ';']).trim();
            if body.is_empty() {
                continue;
            }
            body.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        lines.push(line);
    }
    // Drop headings whose section ended up empty (e.g. "References" after refs were removed).
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    for line in lines {
        let is_heading = line.starts_with("==");
        if is_heading
            && let Some(prev) = out.last()
            && prev.starts_with("==")
            && heading_level(prev) >= heading_level(&line)
        {
            out.pop();
        }
        out.push(line);
    }
    while out.last().is_some_and(|l| l.starts_with("==")) {
        out.pop();
    }
    out.join("\n")
}

fn heading_level(l: &str) -> usize {
    l.chars().take_while(|&c| c == '=').count()
}
