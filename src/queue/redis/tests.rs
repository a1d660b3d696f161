//! Unit tests of the Redis store's encodings; its behaviour is tested against a live server
//! by `tests/store_suite.rs`.

use super::decode::{decode_cursor, dlq_member, encode_cursor};

#[test]
fn cursor_round_trips_and_rejects_garbage() {
    let c = encode_cursor(1234, "evt_a:b");
    assert_eq!(decode_cursor(&c).unwrap(), (1234, "evt_a:b".to_owned()));
    for bad in ["nonsense", "12:", "-5:evt", "x:evt"] {
        assert!(decode_cursor(bad).is_err(), "{bad}");
    }
}

#[test]
fn dlq_members_sort_by_time_then_id() {
    let mut m = [
        dlq_member(1000, "evt_b"),
        dlq_member(999, "evt_z"),
        dlq_member(1000, "evt_a"),
        dlq_member(10_000, "evt_a"),
    ];
    m.sort();
    assert_eq!(
        m,
        [
            dlq_member(999, "evt_z"),
            dlq_member(1000, "evt_a"),
            dlq_member(1000, "evt_b"),
            dlq_member(10_000, "evt_a"),
        ]
    );
}
