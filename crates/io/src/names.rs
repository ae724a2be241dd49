//! Names that become file names, URL segments and model ids (experts, domains): limited to a
//! safe character set where they enter, so no name read from a file can leave its folder or
//! carry terminal escapes.

/// Longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Checks `name`: 1 to [`MAX_NAME_BYTES`] ASCII letters, digits, `-`, `_`, `.` or `+` (experts
/// trained on a mix are named `math+code`), not starting with `.` (so neither `..` nor a hidden
/// file). The error says what is allowed.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid name: use 1 to {MAX_NAME_BYTES} ASCII letters, digits, `-`, `_`, \
             `.` or `+`, not starting with `.`",
            crate::term::printable(name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_pass_and_others_are_refused() {
        for ok in [
            "code",
            "math-v2",
            "en_US.1",
            "A",
            "math+code",
            &"x".repeat(64),
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            "a\u{1b}[31m",
            "a\\b",
            &"x".repeat(65),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("not a valid name"), "{bad}: {e}");
            assert!(!e.contains('\u{1b}'), "escapes reach the message: {e}");
        }
    }
}
