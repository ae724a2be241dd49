//! Panics of third-party readers (GGUF headers, Parquet pages) turned into errors, so that a
//! damaged file gives a message naming it instead of a crash.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// Set while this thread runs inside [`catch_panic`]: its panics are caught, not printed.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a panic inside it comes back as `Err` with the panic's message, and the panic hook
/// prints nothing for it (panics elsewhere print as usual). Only for code that reads untrusted
/// bytes with a library known to panic on some of them.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was));
    result.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors() {
        assert_eq!(catch_panic(|| 3), Ok(3));
        let zero = std::hint::black_box(0u64);
        let e = catch_panic(|| 1 / zero).unwrap_err();
        assert!(e.contains("divide by zero"), "{e}");
        assert_eq!(
            catch_panic(|| -> u8 { panic!("bad {}", 7) }),
            Err("bad 7".into())
        );
    }
}
