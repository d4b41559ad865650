//! When Docker reported a change, carried through Consul from the registrar to the lb so that
//! the lb can tell how long the change took to reach its table. The registrar writes the
//! times; the lb reads them. Times are microseconds since the Unix epoch on the registrar's
//! clock (the lb reports a time ahead of its own clock as skew rather than hiding it).
//!
//! - Service Meta [`META_STARTED_AT`]: when Docker reported the container started (the event
//!   whose registration this is).
//! - A Docker-health TTL check's output: when Docker reported the container healthy.
//! - A maintenance reason (the maintenance check's notes): when Docker reported the container
//!   told to stop.
//!
//! The two free texts carry the time as `(switchyard-at=MICROS)`, written by [`note`].

/// Service Meta key of the time Docker reported the container started.
pub const META_STARTED_AT: &str = "switchyard-started-at";

const MARK: &str = "(switchyard-at=";

/// `text` with the time `at_us` appended where [`parse`] finds it.
pub fn note(text: &str, at_us: u64) -> String {
    format!("{text} {MARK}{at_us})")
}

/// The time a [`note`] carries, if any.
pub fn parse(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(MARK)? + MARK.len()..];
    let digits = rest.strip_suffix(')').unwrap_or(rest);
    digits.parse().ok()
}

/// A Meta value of [`META_STARTED_AT`].
pub fn parse_meta(value: &str) -> Option<u64> {
    value.parse().ok()
}

/// Deserializes a free text (a check's output or notes) as the time it carries: the text
/// itself is not kept, nor copied when the input can lend it, since a check's output can be
/// kilobytes and every check of every answer passes here.
pub(crate) fn in_text<'de, D>(d: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(parse(v))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(Text)
        }
    }
    d.deserialize_option(Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_carries_its_time() {
        let n = note("Docker health: healthy", 1_733_440_000_123_456);
        assert_eq!(n, "Docker health: healthy (switchyard-at=1733440000123456)");
        assert_eq!(parse(&n), Some(1_733_440_000_123_456));
        assert_eq!(parse("HTTP GET http://10.0.0.5/health: 200 OK"), None);
        assert_eq!(parse("(switchyard-at=12x)"), None);
        assert_eq!(parse("(switchyard-at=)"), None);
        assert_eq!(parse("x (switchyard-at=99"), Some(99));
    }

    #[test]
    fn a_check_keeps_only_the_times_its_texts_carry() {
        let c: crate::HealthCheck = serde_json::from_str(
            r#"{"CheckID": "c", "Status": "critical", "Output": "a \"quoted\" (switchyard-at=7)",
                "Notes": null}"#,
        )
        .unwrap();
        assert_eq!((c.output_at, c.notes_at), (Some(7), None));
        let c: crate::HealthCheck =
            serde_json::from_str(r#"{"CheckID": "c", "Status": "passing"}"#).unwrap();
        assert_eq!((c.output_at, c.notes_at), (None, None));
    }
}
