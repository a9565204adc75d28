//! The double-leader rule of the cluster sampler, on hand-made samples: it
//! must flag provable overlaps of two leaderships and nothing else.

mod support;

use std::time::Duration;
use support::cluster::{Sample, Timeline};

fn sample(slot: usize, sent_us: u64, received_us: u64, status: u16, term: u64) -> Sample {
    Sample {
        slot,
        sent_us,
        received_us,
        status,
        term,
    }
}

#[test]
fn a_200_inside_another_nodes_tenure_is_a_violation() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 100, 200, 3),
        sample(1, 200, 300, 200, 4),
        sample(0, 400, 500, 200, 3),
    ]);
    let violations = timeline.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(
        (violations[0].tenure_slot, violations[0].tenure_term),
        (0, 3)
    );
    assert_eq!(violations[0].intruder.slot, 1);
}

#[test]
fn a_clean_handoff_is_no_violation_however_fast() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 100, 200, 3),
        sample(0, 110, 150, 200, 3),
        sample(1, 140, 160, 503, 3),
        sample(1, 151, 170, 200, 4),
        sample(0, 160, 190, 503, 4),
        sample(1, 200, 220, 200, 4),
    ]);
    assert!(timeline.violations().is_empty());
    assert_eq!(timeline.leaderships(), vec![(0, 3), (1, 4)]);
}

#[test]
fn overlapping_200s_are_ambiguous_not_violations() {
    let timeline = Timeline::new(vec![sample(0, 0, 100, 200, 3), sample(1, 50, 150, 200, 4)]);
    assert!(timeline.violations().is_empty());
    assert_eq!(timeline.ambiguous_overlaps(), 1);
}

#[test]
fn a_later_tenure_of_the_same_node_in_a_new_term_is_not_one_tenure() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 10, 200, 3),
        sample(1, 500, 510, 200, 4),
        sample(0, 1_000, 1_010, 200, 5),
    ]);
    assert!(timeline.violations().is_empty());
}

#[test]
fn the_leaderless_gap_is_bounded_by_the_surrounding_200s() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 100, 200, 3),
        sample(0, 2_000, 2_100, 0, 0),
        sample(1, 300_000, 300_200, 200, 4),
        sample(1, 302_000, 302_100, 200, 4),
    ]);
    assert_eq!(
        timeline.max_leaderless_gap(),
        Duration::from_micros(300_200)
    );
}
