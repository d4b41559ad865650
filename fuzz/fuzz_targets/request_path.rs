//! Request paths as the lb routes and forwards them: normalising never panics, is idempotent,
//! and leaves no dot segment or empty segment that could climb out of a route.
#![no_main]
use libfuzzer_sys::fuzz_target;

use lb::proxy::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normal) = normalize_path(path) else {
        return;
    };
    if !path.starts_with('/') {
        return;
    }
    assert_eq!(
        normalize_path(&normal).as_deref(),
        Ok(&*normal),
        "not idempotent: {path:?}"
    );
    assert!(normal.starts_with('/'));
    assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    for segment in normal.split('/') {
        let name = segment.split(';').next().unwrap_or("");
        assert!(name != "." && name != "..", "{path:?} -> {normal:?}");
    }
});
