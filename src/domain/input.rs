//! Client input shown back: how an error message quotes a caller's value.

/// Characters of a caller's value an error message quotes at most.
pub const QUOTE_CHARS: usize = 64;

/// A caller's value as error messages quote it: at most `QUOTE_CHARS` characters, control
/// characters escaped, and the full size named when it was cut (`abc… (102400 bytes)`). A bad
/// value is never echoed whole: a 100 KB one would otherwise come back in the status message and
/// break the reply's metadata limit, and escape codes would reach logs and terminals.
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    let mut cut = false;
    for (n, c) in s.chars().enumerate() {
        if n == QUOTE_CHARS {
            cut = true;
            break;
        }
        out.extend(c.escape_debug());
    }
    if cut {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote("home"), "home");
        assert_eq!(quote("a\u{1b}[31m"), "a\\u{1b}[31m");
        let big = "x".repeat(100 * 1024);
        let q = quote(&big);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("… (102400 bytes)"), "{q}");
        assert_eq!(quote(&"é".repeat(64)), "é".repeat(64), "64 characters are quoted whole");
    }
}
