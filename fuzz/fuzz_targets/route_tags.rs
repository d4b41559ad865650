//! The routing-tag grammar (the contract between registrar and lb): any tags, one a line,
//! parse without a panic, and every tag is either routing or reported as an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_consul::tags::{parse_route, parse_tags, path_matches};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_tags("lb", text.lines());
    for line in text.lines() {
        if let Ok(key) = parse_route(line) {
            // A route's own prefix always matches itself.
            assert!(path_matches(&key.prefix, &key.prefix), "{key:?}");
        }
    }
});
