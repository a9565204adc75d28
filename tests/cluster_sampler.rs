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

#[test]
fn a_failover_runs_from_the_fault_to_the_first_200_elsewhere_asked_after_it() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 100, 200, 3),
        sample(1, 900, 1_000, 200, 4),
        sample(0, 1_500, 1_600, 0, 0),
        sample(1, 2_000, 2_300, 200, 4),
    ]);
    assert_eq!(
        timeline.first_200_elsewhere(1_000, 0),
        Some(Duration::from_micros(1_300)),
        "the 200 asked before the fault does not count"
    );
    assert_eq!(timeline.first_200_elsewhere(1_000, 1), None);
}

#[test]
fn a_handoff_gap_runs_from_the_old_leaders_last_200_to_the_new_ones_first() {
    let timeline = Timeline::new(vec![
        sample(0, 0, 100, 200, 3),
        sample(0, 1_000, 1_100, 200, 3),
        sample(0, 2_000, 2_100, 503, 0),
        sample(1, 2_500, 2_700, 200, 4),
    ]);
    assert_eq!(
        timeline.handoff_gap(500, 0),
        Ok(Duration::from_micros(1_700))
    );
    let still_leading = Timeline::new(vec![sample(0, 1_000, 1_100, 200, 3)]);
    assert_eq!(
        still_leading.handoff_gap(500, 0),
        Err("the old leader never stopped answering 200")
    );
}
