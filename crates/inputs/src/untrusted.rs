//! Third-party readers (candle's pickle and GGUF readers, `tokenizers`' tokenizer.json
//! reader, libjpeg through mozjpeg, which reports errors by unwinding) run on files
//! kollava did not write. Where such a reader panics on malformed bytes instead of returning an error (the
//! fuzzers found several), [`guard`] turns the panic into an error for that file, and the
//! panic prints nothing: the user sees one line naming the file.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Whether this thread is inside [`guard`] (its panics are reported as errors).
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, returning the panic's message as the error if it panics.
pub fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the reader failed".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(guard(|| 3), Ok(3));
        let v: Vec<u8> = Vec::new();
        let e = guard(|| v[1]).unwrap_err();
        assert!(e.contains("index out of bounds"), "{e}");
        // Nested: the inner guard leaves the outer one in force.
        let e = guard(|| {
            let _ = guard(|| ());
            panic!("outer")
        });
        assert_eq!(e, Err("outer".to_string()));
    }
}
