//! Text from outside — the source tree, the recipe, the guest's names, logs
//! and console — escaped before reprovm prints it. Control characters
//! (ESC, CSI, BEL, backspace, carriage return…), DEL, the C1 controls and the
//! Unicode bidirectional overrides become visible escapes, so nothing a build
//! prints can move the cursor, fake reprovm's own lines, retitle the window
//! or write the clipboard (OSC 52). Newlines and tabs stay as they are.
//! Files on disk (build.log, serial.log, artifacts) keep the raw bytes.

use std::borrow::Cow;
use std::io::{self, Write};

/// Whether `c` must not reach a terminal as it is.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    let n = c as u32;
    if n < 0x100 {
        out.push_str(&format!("\\x{n:02x}"));
    } else {
        out.push_str(&format!("\\u{{{n:x}}}"));
    }
}

/// `text` with every control character escaped (`\x1b`, `\u{202e}`);
/// borrowed when nothing needed escaping.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes from outside as printable text: invalid UTF-8 bytes become `\xNN`,
/// control characters are escaped as by [`escape`].
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A writer that escapes a byte stream (a build's live output) on its way
/// to `inner`. A UTF-8 sequence split across writes is held back until it is
/// complete, so escaping does not depend on how the stream was chunked.
pub struct EscapingWriter<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> EscapingWriter<W> {
    /// Escapes everything written on its way to `inner`.
    pub fn new(inner: W) -> EscapingWriter<W> {
        EscapingWriter { inner, pending: Vec::new() }
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 sequence that is not
/// complete yet (0 when the end is complete or invalid).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let needed = match b {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return 0,
            };
            return if needed > back { back } else { 0 };
        }
    }
    0
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let keep = incomplete_tail(&self.pending);
        let ready = self.pending.len() - keep;
        let text = escape_bytes(&self.pending[..ready]);
        self.pending.drain(..ready);
        self.inner.write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for EscapingWriter<W> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let text = escape_bytes(&self.pending);
            let _ = self.inner.write_all(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_attacks_become_visible_text() {
        let osc52 = "\u{1b}]52;c;ZXZpbA==\u{7}";
        assert_eq!(escape(osc52), "\\x1b]52;c;ZXZpbA==\\x07");
        assert_eq!(escape("ok\r\u{1b}[2Kverified\n"), "ok\\x0d\\x1b[2Kverified\n");
        assert_eq!(escape("\u{9b}31m"), "\\x9b31m", "C1 CSI");
        assert_eq!(escape("a\u{202e}b"), "a\\u{202e}b", "bidi override");
        assert_eq!(escape("\u{7f}"), "\\x7f");
        assert!(matches!(escape("plain text\twith tab\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn invalid_utf8_is_shown_as_bytes() {
        assert_eq!(escape_bytes(b"a\xffb\x1b"), "a\\xffb\\x1b");
        assert_eq!(escape_bytes("grüß".as_bytes()), "grüß");
    }

    #[test]
    fn the_stream_escapes_the_same_however_it_is_split() {
        let input = "x\u{1b}[31mré\u{9b}d€\u{1F600}\n".as_bytes();
        let whole = escape_bytes(input);
        for split in 0..input.len() {
            let mut out = Vec::new();
            {
                let mut w = EscapingWriter::new(&mut out);
                w.write_all(&input[..split]).unwrap();
                w.write_all(&input[split..]).unwrap();
            }
            assert_eq!(String::from_utf8(out).unwrap(), whole, "split at {split}");
        }
        let mut out = Vec::new();
        EscapingWriter::new(&mut out).write_all(b"\xe2\x82").unwrap();
        assert_eq!(out, b"\\xe2\\x82", "an unfinished sequence is flushed as bytes");
    }
}
