//! Text from files (expert names and domains, model names, file names, error messages quoting
//! them) made safe to print to a terminal: a downloaded expert file must not be able to send
//! escape sequences (colours, cursor moves, window titles, clipboard writes) to the user's
//! terminal, nor fake lines of output.

use std::borrow::Cow;

/// `text` with every control character written as an escape: C0 controls, DEL and C1 controls
/// as `\x1b`-style escapes (`\n`, `\t`, `\r` as themselves), and the Unicode bidirectional
/// overrides and isolates (which reorder what the reader sees) as `\u{202e}`. For one-line
/// fields: names, domains, paths. Text without any comes back borrowed.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// Like [`printable`], but newlines and tabs are kept: for messages that may span lines
/// (errors, tables).
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

fn needs_escape(c: char, keep_lines: bool) -> bool {
    if keep_lines && (c == '\n' || c == '\t') {
        return false;
    }
    c.is_control() || is_bidi_control(c)
}

fn escape(text: &str, keep_lines: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| needs_escape(c, keep_lines)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !needs_escape(c, keep_lines) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped() {
        assert!(matches!(printable("code-v2 é"), Cow::Borrowed(_)));
        assert_eq!(printable("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(printable("a\nb\tc\rd\x07\x7f"), "a\\nb\\tc\\rd\\x07\\x7f");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(
            printable_lines("a\n\tb\x1b]0;x\x07"),
            "a\n\tb\\x1b]0;x\\x07"
        );
    }
}
