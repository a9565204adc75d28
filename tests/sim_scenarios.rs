//! Multi-node stories run through the deterministic simulator. Each test runs
//! many seeds and names the seed of any failure so it can be replayed.

#[path = "support/sim.rs"]
mod sim_support;

use raft_elector::raft::Role;
use raft_elector::sim::{Sim, SimConfig};
use sim_support::adversarial_clocks;
use std::time::Duration;

/// Elects a first leader and lets it settle; returns its slot.
fn settled(sim: &mut Sim, seed: u64) -> usize {
    sim.run_until_lease(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("seed {seed}: no first leader"));
    sim.run_for(Duration::from_millis(500));
    sim.lease_holder()
        .unwrap_or_else(|| panic!("seed {seed}: no lease holder after settling"))
}

/// Starts 5 nodes at once and returns (terms used, time) until the first
/// leader with a lease, or None if there is none within 5 s.
fn cold_start(seed: u64, fixed_timeout: bool, delay_us: (u64, u64)) -> (u64, Option<Duration>) {
    let mut cfg = SimConfig::new(5, seed);
    if fixed_timeout {
        cfg.raft.election_timeout_max = cfg.raft.election_timeout_min;
    }
    cfg.drift = 0.0;
    cfg.delay = (
        Duration::from_micros(delay_us.0),
        Duration::from_micros(delay_us.1),
    );
    let mut sim = Sim::new(cfg);
    let took = sim.run_until_lease(Duration::from_secs(5));
    (sim.max_term().0, took)
}

/// Crashes the settled leader and returns how many terms it took to elect a
/// new leader with a lease (None: none within 5 s).
fn rounds_after_crash(seed: u64, fixed_timeout: bool) -> Option<u64> {
    let mut cfg = SimConfig::new(5, seed);
    cfg.drift = 0.0;
    let mut sim = Sim::new(cfg.clone());
    let leader = settled(&mut sim, seed);
    if fixed_timeout {
        // Same cluster, now with a fixed timeout on every node.
        cfg.raft.election_timeout_max = cfg.raft.election_timeout_min;
        sim = Sim::new(cfg);
        settled(&mut sim, seed);
    }
    let leader = sim.lease_holder().unwrap_or(leader);
    let before = sim.max_term().0;
    sim.crash(leader);
    sim.run_until_lease(Duration::from_secs(5))?;
    Some(sim.max_term().0 - before)
}

#[test]
fn fixed_election_timeouts_split_votes_for_many_rounds_while_randomized_ones_converge() {
    // The seed article's lesson. Nodes that start together with one fixed
    // timeout all campaign at once, vote for themselves and split, round
    // after round; a randomized timeout lets one node go first.
    let mut fixed_terms = Vec::new();
    let mut fixed_never = 0;
    let mut random_times = Vec::new();
    for seed in 0..200 {
        let (terms, took) = cold_start(seed, true, (1000, 1050));
        fixed_terms.push(terms);
        if took.is_none() {
            fixed_never += 1;
        }
        let (terms, took) = cold_start(seed, false, (1000, 1050));
        let took =
            took.unwrap_or_else(|| panic!("seed {seed}: randomized timeouts elected nobody"));
        assert!(
            terms <= 3,
            "seed {seed}: randomized timeouts used {terms} terms"
        );
        random_times.push(took);
    }
    fixed_terms.sort();
    random_times.sort();
    println!(
        "cold start, 5 nodes: fixed 150 ms: no leader within 5 s in {fixed_never}/200 runs, median {} split rounds; randomized 150-300 ms: leader p50 {:?}, max {:?}",
        fixed_terms[100], random_times[100], random_times[199]
    );
    assert!(
        fixed_never >= 190,
        "fixed timeouts converged in {} runs",
        200 - fixed_never
    );
    assert!(
        fixed_terms[100] >= 20,
        "fixed: only {} rounds in 5 s",
        fixed_terms[100]
    );
    assert!(random_times[199] < Duration::from_millis(700));

    // After a leader crash on a jittery network, fixed timeouts still need
    // several rounds where randomized ones need one.
    let mut fixed: Vec<u64> = (0..200)
        .map(|s| rounds_after_crash(s, true).unwrap_or(100))
        .collect();
    let mut random: Vec<u64> = (0..200)
        .map(|s| rounds_after_crash(s, false).unwrap_or_else(|| panic!("seed {s}: no leader")))
        .collect();
    fixed.sort();
    random.sort();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    println!(
        "after a crash: fixed rounds p50 {} p90 {} mean {:.2}; randomized p50 {} p99 {} mean {:.2}",
        fixed[100],
        fixed[180],
        mean(&fixed),
        random[100],
        random[198],
        mean(&random)
    );
    assert_eq!(random[100], 1);
    assert!(random[198] <= 2);
    assert!(fixed[180] >= 4);
    assert!(mean(&fixed) >= 2.0 * mean(&random));
}

fn minority_leader_loses_lease_first(nodes: usize, seed: u64) {
    let mut cfg = SimConfig::new(nodes, seed);
    cfg.delay = (Duration::from_micros(200), Duration::from_millis(5));
    let mut sim = Sim::new(cfg);
    let old = settled(&mut sim, seed);
    // The old leader and at most a minority-minus-one follower on one side.
    // The old leader and fewer than half of the voters on one side.
    let voters: Vec<usize> = (0..nodes)
        .filter(|n| {
            let config = sim.committed_configuration().unwrap();
            config.is_voter(&sim.node_id(*n).unwrap())
        })
        .collect();
    let mut minority = vec![old];
    minority.extend(
        voters
            .iter()
            .filter(|v| **v != old)
            .take((voters.len() - 1) / 2 - 1),
    );
    assert!(minority.len() * 2 < voters.len());
    let cut = sim.now_nanos();
    sim.partition(&minority);
    let mut old_lease_end = sim.lease_end_nanos(old);
    let took = sim.run_until_condition(Duration::from_secs(5), |s| {
        old_lease_end = old_lease_end.max(s.lease_end_nanos(old));
        (0..nodes).any(|n| !minority.contains(&n) && s.has_lease(n))
    });
    assert!(
        took.is_some(),
        "seed {seed} ({nodes} nodes): the majority side elected no leader with a lease"
    );
    let new_start = sim.now_nanos();
    assert!(
        old_lease_end <= new_start,
        "seed {seed} ({nodes} nodes): old lease ends {:.3} ms after the partition, new one starts {:.3} ms after it",
        (old_lease_end - cut) as f64 / 1e6,
        (new_start - cut) as f64 / 1e6
    );
    assert!(
        !sim.has_lease(old),
        "seed {seed}: the old leader still claims a lease"
    );
    sim.run_for(Duration::from_millis(500));
    assert_ne!(
        sim.core(old).map(|c| c.role()),
        Some(Role::Leader),
        "seed {seed}: CheckQuorum did not depose the minority leader"
    );
    assert!(
        sim.violations().is_empty(),
        "seed {seed}: {:?}",
        sim.violations()
    );
}

#[test]
fn a_partitioned_leader_on_the_minority_side_loses_its_lease_before_a_new_leader_gains_one() {
    for nodes in [3, 5, 7] {
        for seed in 0..300 {
            minority_leader_loses_lease_first(nodes, seed);
        }
    }
}

#[test]
fn a_node_restarted_without_state_rejoins_as_a_new_incarnation_and_the_old_one_is_removed() {
    for seed in 0..100 {
        let mut sim = Sim::new(SimConfig::new(5, seed));
        let leader = settled(&mut sim, seed);
        let follower = (leader + 1) % 5;
        let old_id = sim.node_id(follower).unwrap();
        sim.crash(follower);
        sim.run_for(Duration::from_millis(300));
        sim.restart_without_state(follower);
        let new_id = sim.node_id(follower).unwrap();
        assert_eq!(new_id.name, old_id.name);
        assert_ne!(new_id.incarnation, old_id.incarnation, "seed {seed}");
        sim.run_for(Duration::from_secs(3));
        let config = sim.committed_configuration().unwrap();
        assert!(
            !config.contains(&old_id),
            "seed {seed}: old incarnation still a member"
        );
        assert!(
            config.is_voter(&new_id),
            "seed {seed}: new incarnation not promoted"
        );
        assert_eq!(config.voters.len(), 5, "seed {seed}");
        assert!(sim.lease_holder().is_some(), "seed {seed}: no leader");
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
    }
}

#[test]
fn a_graceful_transfer_hands_over_without_waiting_for_an_election_timeout() {
    for seed in 0..200 {
        let mut sim = Sim::new(SimConfig::new(5, seed));
        let old = settled(&mut sim, seed);
        assert!(sim.transfer_leadership(old), "seed {seed}");
        assert!(
            !sim.has_lease(old),
            "seed {seed}: lease kept during transfer"
        );
        let took = sim
            .run_until_condition(Duration::from_secs(2), |s| {
                (0..5).any(|n| n != old && s.has_lease(n))
            })
            .unwrap_or_else(|| panic!("seed {seed}: no new leader"));
        // Three one-way hops of at most 1.5 ms each, plus the lease round.
        assert!(
            took < Duration::from_millis(20),
            "seed {seed}: handoff took {took:?}"
        );
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
    }
}

#[test]
fn a_node_that_leaves_is_removed_from_the_configuration() {
    for seed in 0..50 {
        let mut cfg = SimConfig::new(5, seed);
        cfg.drive_membership = false;
        let mut sim = Sim::new(cfg);
        let leader = settled(&mut sim, seed);
        let leaving = (leader + 2) % 5;
        let id = sim.node_id(leaving).unwrap();
        assert!(
            sim.leave(leaving),
            "seed {seed}: no leader known to the leaving node"
        );
        sim.run_for(Duration::from_millis(200));
        let config = sim.committed_configuration().unwrap();
        assert!(!config.contains(&id), "seed {seed}: {id} still a member");
        assert_eq!(config.voters.len(), 4);
    }
}

/// Partitions the leader right after a majority acknowledged a round, with
/// its clock as slow and the others' as fast as `drift` allows, the least
/// message delay and a near-fixed timeout: the tightest race the lease
/// argument has. Returns the simulator after a new leader took over.
fn tightest_lease_race(seed: u64, lease_drift: f64, clock_drift: f64) -> Sim {
    let mut cfg = SimConfig::new(5, seed);
    cfg.raft.max_clock_drift = lease_drift;
    cfg.raft.election_timeout_max = cfg.raft.election_timeout_min + Duration::from_micros(200);
    cfg.delay = (Duration::from_micros(1), Duration::from_micros(2));
    cfg.drift = 0.0;
    let mut sim = Sim::new(cfg);
    sim.run_until_lease(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("seed {seed}: no first leader"));
    sim.run_for(Duration::from_millis(300));
    let old = sim
        .lease_holder()
        .unwrap_or_else(|| panic!("seed {seed}: no leader"));
    adversarial_clocks(&mut sim, 5, old, clock_drift);
    // Wait for the lease to be extended by a fresh majority acknowledgement.
    let before = sim.lease_end_nanos(old);
    sim.run_until_condition(Duration::from_millis(200), |s| {
        s.lease_end_nanos(old) > before
    })
    .unwrap_or_else(|| panic!("seed {seed}: lease never extended"));
    sim.partition(&[old]);
    sim.run_until_condition(Duration::from_secs(3), |s| {
        (0..5).any(|n| n != old && s.has_lease(n))
    })
    .unwrap_or_else(|| panic!("seed {seed}: no new leader"));
    sim.run_for(Duration::from_millis(200));
    sim
}

#[test]
fn the_lease_holds_in_the_tightest_race_the_drift_bound_allows() {
    for seed in 0..200 {
        let sim = tightest_lease_race(seed, 0.01, 0.01);
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
    }
}

#[test]
fn the_checker_catches_a_lease_that_ignores_clock_drift() {
    // The same race with a lease of the full election_timeout_min (no drift
    // allowance) on clocks 1% apart: the invariant check must fire.
    let caught = (0..200)
        .filter(|seed| {
            !tightest_lease_race(*seed, 0.0, 0.01)
                .violations()
                .is_empty()
        })
        .count();
    assert!(
        caught >= 100,
        "only {caught}/200 races caught the overlong lease"
    );
}

#[test]
fn retiring_nodes_never_lead_again_and_the_others_elect_a_leader_among_themselves() {
    for seed in 0..100 {
        let mut cfg = SimConfig::new(5, seed);
        cfg.drive_membership = false;
        let mut sim = Sim::new(cfg);
        let old = settled(&mut sim, seed);
        // The leader and the next node get SIGTERM a few ms apart, as in a
        // scale-down; neither leaves, so both stay voters that still vote.
        let other = (old + 1) % 5;
        assert!(sim.retire(old), "seed {seed}: the leader was leading");
        sim.run_for(Duration::from_millis(3));
        sim.retire(other);
        sim.run_for(Duration::from_secs(2));
        let holder = sim
            .lease_holder()
            .unwrap_or_else(|| panic!("seed {seed}: no leader among the rest"));
        assert!(
            holder != old && holder != other,
            "seed {seed}: retired node-{holder} leads"
        );
        for slot in [old, other] {
            let core = sim.core(slot).expect("alive");
            assert_ne!(core.role(), Role::Leader, "seed {seed}: node-{slot}");
            assert_ne!(core.role(), Role::Candidate, "seed {seed}: node-{slot}");
        }
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
    }
}

#[test]
fn a_group_retiring_at_once_elects_nobody_and_its_leader_abdicates() {
    for seed in 0..100 {
        let mut sim = Sim::new(SimConfig::new(5, seed));
        let old = settled(&mut sim, seed);
        let term = sim.max_term();
        // SIGTERM reaches every member within a millisecond or two, leader
        // first or last depending on the seed.
        let mut order: Vec<usize> = (0..5).collect();
        order.rotate_left((seed as usize) % 5);
        for slot in order {
            sim.retire(slot);
            sim.run_for(Duration::from_micros(300));
        }
        // The runtime asks to leave again every 200 ms (and at once when
        // its leader changes); nodes left without a leader tell everyone.
        for _ in 0..3 {
            sim.run_for(Duration::from_millis(200));
            for slot in 0..5 {
                sim.leave(slot);
            }
        }
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.leader(), None, "seed {seed}: someone still leads");
        assert!(
            sim.max_term() <= term.next(),
            "seed {seed}: elections after retiring ({term} -> {})",
            sim.max_term()
        );
        // Nobody waits for a removal that cannot come: each was removed,
        // heard its leader leave without a successor, or knows every other
        // voter is leaving.
        for slot in 0..5 {
            let core = sim.core(slot).expect("alive");
            let removed = !core.configuration().0.contains(core.id());
            assert!(
                removed || core.leader_abdicated() || core.others_retiring(),
                "seed {seed}: node-{slot} (old leader node-{old}) would wait for a removal: {}",
                (0..5)
                    .map(|n| {
                        let c = sim.core(n).expect("alive");
                        format!(
                            "node-{n} {} term {} leader {:?} abdicated {} others {} config {:?}",
                            c.role(),
                            c.term(),
                            c.leader().map(|l| l.name.clone()),
                            c.leader_abdicated(),
                            c.others_retiring(),
                            c.configuration()
                                .0
                                .voters
                                .keys()
                                .map(|v| v.name.clone())
                                .collect::<Vec<_>>()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        assert!(
            sim.violations().is_empty(),
            "seed {seed}: {:?}",
            sim.violations()
        );
    }
}
