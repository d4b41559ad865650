//! The blocking-query index rules (Consul docs, "Blocking Queries"): what index to send next.

/// Returns the index to send with the next blocking query, given the one we sent and the
/// `X-Consul-Index` we got back.
///
/// - An index that went backwards (snapshot restore, a fresh server) resets to 0 so the next
///   read returns at once with the new state instead of waiting out `wait`.
/// - Index 0 after a response would turn blocking into a busy loop; Consul documents 1 as always
///   safe, so clamp to at least 1.
pub fn next_index(sent: u64, returned: u64) -> u64 {
    if returned < sent {
        0
    } else {
        returned.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::next_index;

    #[test]
    fn index_rules() {
        let cases = [
            // (sent, returned, next)
            (0, 0, 1),    // clamp: never block on 0
            (0, 42, 42),  // first read
            (42, 42, 42), // timeout with no change
            (42, 50, 50), // change
            (50, 7, 0),   // went backwards: reset and read at once
            (50, 0, 0),   // fresh server reporting 0: reset, then the clamp applies
        ];
        for (sent, returned, next) in cases {
            assert_eq!(
                next_index(sent, returned),
                next,
                "sent={sent} returned={returned}"
            );
        }
    }
}
