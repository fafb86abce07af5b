//! Fuzzes the QMP server's input parser (`qmp_ext::JsonStream`).
//!
//! Properties checked on every input, besides not panicking:
//! - the result does not depend on how the bytes are split into reads
//!   (the server sees arbitrary recv() boundaries);
//! - every parsed value, printed as standard JSON and parsed again, gives
//!   the same value (what the parser accepts, it understands).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_ext::JsonStream;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size for the split feed.
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = JsonStream::new().feed(input);

    let mut chunked = JsonStream::new();
    let step = usize::from(split % 16) + 1;
    let mut pieces = Vec::new();
    for chunk in input.chunks(step) {
        pieces.extend(chunked.feed(chunk));
    }
    assert_eq!(whole, pieces, "result depends on read boundaries");

    for value in whole.into_iter().flatten() {
        let mut text = value.to_string().into_bytes();
        text.push(b'\n');
        let again = JsonStream::new().feed(&text);
        assert_eq!(again, vec![Ok(value)], "printed value does not parse back");
    }
});
