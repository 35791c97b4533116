//! Text that came from outside (a hook's output, an agent's error message,
//! a gate's output) on its way to a person: clipped to a length at a
//! character boundary, with control characters made visible, so that no
//! byte sequence can panic the code that shows it or rewrite the terminal
//! that reads it.

/// At most `max` bytes of `s`, cut at a character boundary, with control
/// characters other than newline and tab escaped; "…" marks a cut.
pub fn clip(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for c in s.chars() {
        let piece: String = if c.is_control() && c != '\n' && c != '\t' {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Like [`clip`] on bytes that may not be UTF-8.
pub fn clip_bytes(b: &[u8], max: usize) -> String {
    clip(&String::from_utf8_lossy(b), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_cuts_inside_a_character() {
        let s = "é".repeat(100) + "\u{1b}[2J";
        for max in 0..210 {
            let c = clip(&s, max);
            assert!(c.len() <= max + '…'.len_utf8(), "{max}: {}", c.len());
        }
        assert!(clip("a\u{1b}[2Jb", 100).contains("\\u{1b}"));
        assert_eq!(clip("ok\n", 100), "ok\n");
        assert_eq!(clip_bytes(&[0xff, b'a'], 10), "\u{fffd}a");
    }
}
