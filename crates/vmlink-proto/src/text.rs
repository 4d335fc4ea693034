//! Showing a peer's text on a terminal.
//!
//! A guest chooses the strings in its errors and its `Info` (hostname, OS, kernel), and
//! qemu-ga's answers; a compromised one can put terminal escape sequences in them (`ESC ] 52`
//! writes the clipboard, `ESC [ 2 J` clears the screen). Before such text is printed for a
//! person, [`printable`] escapes its control characters. Command output (`exec`, `logs`) is the
//! command's and stays raw, as with ssh; JSON output is escaped by its encoder.

use std::borrow::Cow;

/// `s` with every control character (C0, DEL and C1: [`char::is_control`]) replaced by its
/// Rust escape (`\n`, `\t`, `\u{1b}`, `\u{9b}`), as [`char::escape_debug`] writes them; all other
/// text, non-ASCII letters included, is unchanged (and borrowed).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_is_unchanged_and_borrowed() {
        for s in [
            "",
            "guest-1.example",
            "Debian GNU/Linux 12 (bookworm)",
            "Grüße, 日本語, ελληνικά, emoji 🦀",
            r"C:\path with \u{1b} written out",
        ] {
            assert!(matches!(printable(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn controls_are_escaped() {
        let hostile = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}]52;c;ZXZpbA==\u{7}";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(
            printable("a\u{1b}[2Jb"),
            r"a\u{1b}[2Jb",
            "ESC is written out, the rest kept"
        );
        assert_eq!(printable("x\ny\tz\r\0"), r"x\ny\tz\r\0");
        // DEL and the C1 controls (U+009B is a one-character CSI on some terminals).
        assert_eq!(printable("\u{7f}\u{9b}2J\u{85}é"), r"\u{7f}\u{9b}2J\u{85}é");
    }
}
