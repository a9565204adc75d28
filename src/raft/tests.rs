//! Per-rule tests: one event into a fixture core, then the exact effect.

use super::*;
use std::time::Duration;

fn id(name: &str) -> NodeId {
    NodeId::new(name, 1)
}

/// A `leader_contact_age` (ns) of a voter that has not heard from a leader
/// for a second: its stickiness window is long over.
const LONG_AGO: u64 = 1_000_000_000;

fn ms(v: u64) -> Time {
    Time::from_nanos(v * 1_000_000)
}

fn three_voters() -> Configuration {
    Configuration::with_voters(["a", "b", "c"].map(|n| (id(n), format!("{n}:4041"))))
}

/// A fresh node `name`, bootstrapped into {a, b, c} at t = 1000 ms.
fn node(name: &str) -> RaftCore {
    let mut core = RaftCore::fresh(
        Config::default(),
        id(name),
        format!("{name}:4041"),
        7,
        ms(1000),
    );
    core.bootstrap(three_voters(), ms(1000)).unwrap();
    core.take_ready();
    core
}

fn msg(from: &str, to: &str, term: u64, body: MessageBody) -> Message {
    Message {
        from: id(from),
        to: id(to),
        term: Term(term),
        body,
    }
}

/// Makes `a` the leader of term 1 at t = 2000 ms, with votes from b.
fn leader_a() -> RaftCore {
    leader_a_with(Config::default())
}

/// Like [`leader_a`], with settings `cfg`.
fn leader_a_with(cfg: Config) -> RaftCore {
    let mut a = RaftCore::fresh(cfg, id("a"), "a:4041".into(), 7, ms(1000));
    a.bootstrap(three_voters(), ms(1000)).unwrap();
    a.take_ready();
    a.tick(ms(2000));
    assert_eq!(a.role(), Role::PreCandidate);
    a.step(
        ms(2000),
        msg("b", "a", 1, MessageBody::PreVoteResponse { granted: true }),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Candidate);
    a.step(
        ms(2000),
        msg(
            "b",
            "a",
            1,
            MessageBody::RequestVoteResponse {
                granted: true,
                leader_contact_age: LONG_AGO,
            },
        ),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Leader);
    a.take_ready();
    a
}

fn ack(from: &str, term: u64, last_index: u64, round: Time) -> Message {
    msg(
        from,
        "a",
        term,
        MessageBody::AppendEntriesResponse {
            success: true,
            last_index,
            round: round.as_nanos(),
        },
    )
}

fn sent_kinds(ready: &Ready) -> Vec<(String, &'static str)> {
    ready
        .messages
        .iter()
        .map(|m| (m.to.name.to_string(), m.body.kind()))
        .collect()
}

#[test]
fn stale_term_message_is_answered_with_the_current_term_and_changes_nothing() {
    let mut b = node("b");
    b.step(
        ms(1500),
        msg(
            "c",
            "b",
            3,
            MessageBody::RequestVoteResponse {
                granted: false,
                leader_contact_age: LONG_AGO,
            },
        ),
    )
    .unwrap();
    b.take_ready();
    let append = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: vec![],
        leader_commit: 1,
        round: 9,
    };
    b.step(ms(1600), msg("a", "b", 2, append)).unwrap();
    let ready = b.take_ready();
    assert!(ready.hard_state.is_none());
    assert_eq!(b.leader(), None, "a stale leader is not followed");
    assert_eq!(ready.messages.len(), 1);
    assert_eq!(ready.messages[0].term, Term(3));
    assert!(matches!(
        ready.messages[0].body,
        MessageBody::AppendEntriesResponse { success: false, .. }
    ));
}

#[test]
fn a_node_votes_once_per_term() {
    let mut c = node("c");
    let t = ms(1000) + Duration::from_millis(400); // past stickiness
    let req = |from| {
        msg(
            from,
            "c",
            2,
            MessageBody::RequestVote {
                last_log_index: 1,
                last_log_term: Term(0),
                transfer: false,
            },
        )
    };
    c.step(t, req("a")).unwrap();
    let first = c.take_ready();
    assert_eq!(first.hard_state.as_ref().unwrap().voted_for, Some(id("a")));
    assert!(matches!(
        first.messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
    c.step(t, req("b")).unwrap();
    let second = c.take_ready();
    assert!(matches!(
        second.messages[0].body,
        MessageBody::RequestVoteResponse { granted: false, .. }
    ));
    // A duplicate request from the same candidate is granted again (idempotent).
    c.step(t, req("a")).unwrap();
    assert!(matches!(
        c.take_ready().messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
}

#[test]
fn a_candidate_with_an_older_log_gets_no_vote() {
    let mut a = leader_a(); // a's log: bootstrap (1, t0) + no-op (2, t1)
    let mut b = node("b");
    let t = ms(3000);
    // b learns a's log.
    let entries = a.log().entries().to_vec();
    b.step(
        t,
        msg(
            "a",
            "b",
            1,
            MessageBody::AppendEntries {
                prev_log_index: 1,
                prev_log_term: Term(0),
                entries,
                leader_commit: 1,
                round: 1,
            },
        ),
    )
    .unwrap();
    b.take_ready();
    let later = t + Duration::from_millis(400);
    b.step(
        later,
        msg(
            "c",
            "b",
            2,
            MessageBody::RequestVote {
                last_log_index: 1,
                last_log_term: Term(0),
                transfer: false,
            },
        ),
    )
    .unwrap();
    let ready = b.take_ready();
    assert_eq!(b.term(), Term(2));
    assert!(matches!(
        ready.messages[0].body,
        MessageBody::RequestVoteResponse { granted: false, .. }
    ));
    a.take_ready();
}

#[test]
fn pre_vote_does_not_bump_the_term_or_record_a_vote() {
    let mut c = node("c");
    let t = ms(1000) + Duration::from_millis(400);
    c.step(
        t,
        msg(
            "a",
            "c",
            5,
            MessageBody::PreVote {
                last_log_index: 1,
                last_log_term: Term(0),
            },
        ),
    )
    .unwrap();
    let ready = c.take_ready();
    assert_eq!(c.term(), Term(0));
    assert!(ready.hard_state.is_none(), "a pre-vote persists nothing");
    assert_eq!(ready.messages[0].term, Term(5));
    assert_eq!(
        ready.messages[0].body,
        MessageBody::PreVoteResponse { granted: true }
    );
}

#[test]
fn a_follower_that_heard_from_its_leader_recently_ignores_candidates() {
    let mut b = node("b");
    let t = ms(5000);
    b.step(
        t,
        msg(
            "a",
            "b",
            1,
            MessageBody::AppendEntries {
                prev_log_index: 1,
                prev_log_term: Term(0),
                entries: vec![],
                leader_commit: 1,
                round: 1,
            },
        ),
    )
    .unwrap();
    b.take_ready();
    let vote = MessageBody::RequestVote {
        last_log_index: 9,
        last_log_term: Term(9),
        transfer: false,
    };
    b.step(
        t + Duration::from_millis(100),
        msg("c", "b", 2, vote.clone()),
    )
    .unwrap();
    let ready = b.take_ready();
    assert!(
        ready.messages.is_empty(),
        "ignored inside the stickiness window"
    );
    assert_eq!(b.term(), Term(1));
    // After election_timeout_min without the leader, the vote is granted.
    b.step(t + Duration::from_millis(151), msg("c", "b", 2, vote))
        .unwrap();
    let ready = b.take_ready();
    assert!(matches!(
        ready.messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
}

#[test]
fn a_restarted_node_does_not_vote_until_a_stickiness_window_has_passed() {
    let state = node("b").hard_state();
    let start = ms(50_000);
    let mut b = RaftCore::restore(Config::default(), state, "b:4041".into(), 3, start).unwrap();
    let vote = MessageBody::RequestVote {
        last_log_index: 1,
        last_log_term: Term(0),
        transfer: false,
    };
    b.step(
        start + Duration::from_millis(10),
        msg("c", "b", 4, vote.clone()),
    )
    .unwrap();
    assert!(b.take_ready().messages.is_empty());
    b.step(start + Duration::from_millis(160), msg("c", "b", 4, vote))
        .unwrap();
    assert!(matches!(
        b.take_ready().messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
}

#[test]
fn a_message_for_an_old_incarnation_is_refused_without_change() {
    let mut b = node("b");
    let mut m = msg(
        "a",
        "b",
        9,
        MessageBody::RequestVote {
            last_log_index: 1,
            last_log_term: Term(0),
            transfer: true,
        },
    );
    m.to = NodeId::new("b", 0);
    let err = b.step(ms(9000), m).unwrap_err();
    assert_eq!(err.metric_label(), "wrong_recipient");
    assert_eq!(b.term(), Term(0));
    assert!(b.take_ready().is_empty());
}

#[test]
fn a_leader_holds_a_lease_only_after_a_majority_acknowledged_a_round() {
    let mut a = leader_a();
    let round = ms(2000);
    assert!(!a.has_lease(round), "no acknowledgement yet");
    a.step(ms(2001), ack("b", 1, 2, round)).unwrap();
    let lease = Config::default().lease_duration();
    assert_eq!(a.lease_until(), Some(round + lease));
    assert!(a.has_lease(round + lease - Duration::from_millis(1)));
    assert!(!a.has_lease(round + lease));
}

#[test]
fn a_leader_without_a_quorum_steps_down_at_the_check_quorum_deadline() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    // Heartbeats continue; b and c never answer again.
    let mut t = ms(2000);
    while t < ms(2000) + Duration::from_millis(149) {
        t = a.next_deadline();
        a.tick(t);
        a.take_ready();
    }
    assert_eq!(a.role(), Role::Leader, "b answered in the first period");
    while a.role() == Role::Leader && t < ms(3000) {
        t = a.next_deadline();
        a.tick(t);
    }
    assert_eq!(a.role(), Role::Follower);
    assert!(
        t <= ms(2000) + Duration::from_millis(301),
        "stepped down at {t:?}"
    );
    assert_eq!(a.lease_until(), None);
}

#[test]
fn leadership_transfer_gives_up_the_lease_and_sends_timeout_now_to_a_caught_up_voter() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    a.take_ready();
    assert!(a.has_lease(ms(2002)));
    let target = a.transfer_leadership(ms(2002), None).unwrap();
    assert_eq!(target, id("b"), "b is the most up-to-date voter");
    assert!(!a.has_lease(ms(2002)));
    let ready = a.take_ready();
    assert_eq!(sent_kinds(&ready), vec![("b".to_string(), "timeout_now")]);
    // A later acknowledgement does not bring the lease back in this term.
    a.step(ms(2003), ack("c", 1, 2, ms(2002))).unwrap();
    assert!(!a.has_lease(ms(2004)));
    // Without a takeover, a steps down after election_timeout_min.
    a.tick(ms(2002) + Duration::from_millis(150));
    assert_eq!(a.role(), Role::Follower);
}

#[test]
fn timeout_now_makes_the_target_campaign_at_once_and_voters_ignore_stickiness() {
    let mut b = node("b");
    let t = ms(4000);
    let hb = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: vec![],
        leader_commit: 1,
        round: 1,
    };
    b.step(t, msg("a", "b", 1, hb.clone())).unwrap();
    b.take_ready();
    b.step(t, msg("a", "b", 1, MessageBody::TimeoutNow))
        .unwrap();
    assert_eq!(b.role(), Role::Candidate);
    assert_eq!(b.term(), Term(2));
    let ready = b.take_ready();
    let vote = ready
        .messages
        .iter()
        .find(|m| m.to == id("c"))
        .unwrap()
        .clone();
    assert!(matches!(
        vote.body,
        MessageBody::RequestVote { transfer: true, .. }
    ));
    // c heard from a a millisecond ago and still votes for the transfer target.
    let mut c = node("c");
    c.step(t, msg("a", "c", 1, hb)).unwrap();
    c.take_ready();
    c.step(t + Duration::from_millis(1), vote).unwrap();
    assert!(matches!(
        c.take_ready().messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
}

#[test]
fn timeout_now_from_a_node_that_is_not_the_leader_is_ignored() {
    let mut b = node("b");
    b.step(ms(4000), msg("c", "b", 0, MessageBody::TimeoutNow))
        .unwrap();
    assert_eq!(b.role(), Role::Follower);
    assert_eq!(b.term(), Term(0));
}

#[test]
fn a_new_leader_changes_membership_only_after_committing_its_no_op() {
    let mut a = leader_a();
    let d = NodeId::new("d", 1);
    assert_eq!(
        a.propose_add_learner(d.clone(), "d:4041".into()),
        Err(ProposeError::TermNotCommitted)
    );
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    assert_eq!(a.commit_index(), 2);
    let index = a.propose_add_learner(d.clone(), "d:4041".into()).unwrap();
    assert_eq!(index, 3);
    assert!(a.configuration().0.is_learner(&d));
    assert_eq!(
        a.propose_remove(&id("c")),
        Err(ProposeError::ChangeInProgress),
        "one change at a time"
    );
}

/// Acknowledges everything up to `index` from `from` (a member of leader a).
fn ack_from(from: &NodeId, index: u64) -> Message {
    Message {
        from: from.clone(),
        ..ack("b", 1, index, ms(2000))
    }
}

#[test]
fn caught_up_learners_are_promoted_in_pairs_to_an_odd_number_of_voters() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    let (d, e) = (NodeId::new("d", 1), NodeId::new("e", 1));
    a.propose_add_learner(d.clone(), "d:4041".into()).unwrap();
    a.step(ms(2002), ack("b", 1, 3, ms(2000))).unwrap();
    a.step(ms(2002), ack_from(&d, 3)).unwrap();
    assert!(
        a.configuration().0.is_learner(&d),
        "one learner alone would make four voters: no better than three"
    );
    a.propose_add_learner(e.clone(), "e:4041".into()).unwrap();
    a.step(ms(2003), ack("b", 1, 4, ms(2000))).unwrap();
    a.step(ms(2003), ack_from(&d, 4)).unwrap();
    a.step(ms(2003), ack_from(&e, 4)).unwrap();
    assert!(
        a.configuration().0.is_voter(&d),
        "promoted once two are caught up"
    );
    assert_eq!(a.configuration().1, 5);
    // The second promotion follows once the first commits.
    for from in ["b", "c"] {
        a.step(ms(2004), ack(from, 1, 5, ms(2000))).unwrap();
    }
    a.step(ms(2004), ack_from(&d, 5)).unwrap();
    a.step(ms(2004), ack_from(&e, 5)).unwrap();
    assert!(a.configuration().0.is_voter(&e));
    assert_eq!(a.configuration().0.voters.len(), 5);
}

#[test]
fn a_leader_hands_over_to_the_newest_caught_up_voter_rather_than_the_highest_id() {
    // d joins before x; x's id sorts below every other voter's, so an
    // order by id alone would pick d, which a rolling update replaces first.
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    let (d, x) = (NodeId::new("d", 1), NodeId::new("ba", 1));
    a.propose_add_learner(d.clone(), "d:4041".into()).unwrap();
    a.step(ms(2002), ack("b", 1, 3, ms(2000))).unwrap();
    a.propose_add_learner(x.clone(), "x:4041".into()).unwrap();
    for index in 4..=6 {
        for from in [&id("b"), &id("c"), &d, &x] {
            a.step(ms(2003), ack_from(from, index)).unwrap();
        }
    }
    assert!(a.configuration().0.is_voter(&d) && a.configuration().0.is_voter(&x));
    assert_eq!(a.commit_index(), 6);
    assert_eq!((a.member_since(&d), a.member_since(&x)), (3, 4));
    assert_eq!(a.member_since(&id("b")), a.member_since(&id("c")));
    assert_eq!(a.transfer_leadership(ms(2004), None), Ok(x));
}

#[test]
fn a_leader_hands_over_to_a_caught_up_voter_before_a_newer_lagging_one() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    let (d, x) = (NodeId::new("d", 1), NodeId::new("ba", 1));
    a.propose_add_learner(d.clone(), "d:4041".into()).unwrap();
    a.step(ms(2002), ack("b", 1, 3, ms(2000))).unwrap();
    a.propose_add_learner(x.clone(), "x:4041".into()).unwrap();
    for index in 4..=6 {
        for from in [&id("b"), &id("c"), &d, &x] {
            a.step(ms(2003), ack_from(from, index)).unwrap();
        }
    }
    // Something new that x has not acknowledged yet.
    a.propose_add_learner(NodeId::new("f", 1), "f:4041".into())
        .unwrap();
    for from in [&id("b"), &id("c"), &d] {
        a.step(ms(2004), ack_from(from, 7)).unwrap();
    }
    assert_eq!(a.transfer_leadership(ms(2005), None), Ok(d));
}

#[test]
fn learners_beyond_max_voters_stay_learners() {
    let cfg = Config {
        max_voters: 3,
        ..Config::default()
    };
    let mut a = leader_a_with(cfg);
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    let d = NodeId::new("d", 1);
    a.propose_add_learner(d.clone(), "d:4041".into()).unwrap();
    a.step(ms(2002), ack("b", 1, 3, ms(2000))).unwrap();
    let ack_d = Message {
        from: d.clone(),
        ..ack("b", 1, 3, ms(2000))
    };
    a.step(ms(2003), ack_d).unwrap();
    assert!(a.configuration().0.is_learner(&d));
    assert_eq!(a.configuration().0.voters.len(), 3);
}

#[test]
fn a_leader_that_removed_itself_steps_down_once_the_removal_commits() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    a.propose_remove(&id("a")).unwrap();
    assert!(!a.has_lease(ms(2002)), "a non-voter holds no lease");
    assert_eq!(a.role(), Role::Leader, "leads until the change commits");
    a.step(ms(2002), ack("b", 1, 3, ms(2001))).unwrap();
    a.step(ms(2002), ack("c", 1, 3, ms(2001))).unwrap();
    assert_eq!(a.commit_index(), 3);
    assert_eq!(a.role(), Role::Follower);
}

#[test]
fn the_log_is_compacted_to_a_snapshot_and_a_lagging_follower_gets_it() {
    let cfg = Config {
        compaction_threshold: 2,
        ..Config::default()
    };
    let mut a = leader_a_with(cfg);
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    a.propose_add_learner(NodeId::new("d", 1), "d:4041".into())
        .unwrap();
    a.step(ms(2002), ack("b", 1, 3, ms(2000))).unwrap();
    assert_eq!(a.log().snapshot().last_index, 3, "compacted at commit");
    assert!(a.log().entries().is_empty());
    a.take_ready();
    // c never answered: its next index is behind the snapshot.
    a.step(
        ms(2003),
        msg(
            "c",
            "a",
            1,
            MessageBody::AppendEntriesResponse {
                success: false,
                last_index: 0,
                round: 0,
            },
        ),
    )
    .unwrap();
    let ready = a.take_ready();
    let to_c = ready.messages.iter().find(|m| m.to == id("c")).unwrap();
    let MessageBody::InstallSnapshot { snapshot, .. } = &to_c.body else {
        panic!("expected a snapshot, got {to_c}");
    };
    let mut c = node("c");
    c.step(ms(2004), to_c.clone()).unwrap();
    assert_eq!(c.commit_index(), 3);
    assert_eq!(c.configuration().0, &snapshot.config);
}

#[test]
fn bootstrap_is_refused_once_a_node_has_state() {
    let mut b = node("b");
    assert!(matches!(
        b.bootstrap(three_voters(), ms(1)),
        Err(BootstrapError::AlreadyInitialized(_))
    ));
    let mut x = RaftCore::fresh(Config::default(), id("x"), "x:1".into(), 1, ms(1));
    assert_eq!(
        x.bootstrap(three_voters(), ms(1)),
        Err(BootstrapError::SelfNotMember)
    );
}

#[test]
fn a_promised_node_refuses_strangers_and_any_other_first_configuration() {
    let mut x = RaftCore::fresh(Config::default(), id("a"), "a:1".into(), 1, ms(1));
    x.lock_bootstrap(three_voters()).unwrap();
    assert_eq!(
        x.take_ready().hard_state.and_then(|h| h.bootstrap_lock),
        Some(three_voters()),
        "the promise is in the hard state to persist"
    );
    let other = Configuration::with_voters(["a", "d", "e"].map(|n| (id(n), format!("{n}:1"))));
    assert_eq!(
        x.lock_bootstrap(other.clone()),
        Err(BootstrapError::LockedToAnother)
    );
    assert_eq!(
        x.bootstrap(other, ms(2)),
        Err(BootstrapError::LockedToAnother)
    );
    let stranger = msg(
        "d",
        "a",
        3,
        MessageBody::RequestVote {
            last_log_index: 1,
            last_log_term: Term(0),
            transfer: false,
        },
    );
    assert_eq!(
        x.step(ms(500), stranger),
        Err(StepError::OutsideBootstrapLock { from: id("d") })
    );
    assert_eq!(x.term(), Term(0), "a refused message changes nothing");
    // A member's vote request moves the term; bootstrap still works after it.
    let member = msg(
        "b",
        "a",
        3,
        MessageBody::RequestVote {
            last_log_index: 1,
            last_log_term: Term(0),
            transfer: false,
        },
    );
    x.step(ms(500), member).unwrap();
    assert_eq!(x.term(), Term(3));
    x.bootstrap(three_voters(), ms(501)).unwrap();
    assert!(x.is_pristine_bootstrap());
}

#[test]
fn a_single_voter_elects_itself_and_holds_a_lease() {
    let mut a = RaftCore::fresh(Config::default(), id("a"), "a:4041".into(), 1, ms(0));
    a.bootstrap(
        Configuration::with_voters([(id("a"), "a:4041".to_string())]),
        ms(0),
    )
    .unwrap();
    let t = a.next_deadline();
    a.tick(t);
    assert_eq!(a.role(), Role::Leader);
    assert!(a.has_lease(t));
}

#[test]
fn a_sole_voter_commits_a_change_even_when_no_member_ever_answers() {
    let mut a = RaftCore::fresh(Config::default(), id("a"), "a:4041".into(), 1, ms(0));
    a.bootstrap(
        Configuration::with_voters([(id("a"), "a:4041".to_string())]),
        ms(0),
    )
    .unwrap();
    let t = a.next_deadline();
    a.tick(t);
    assert_eq!(a.role(), Role::Leader);
    let index = a.propose_add_learner(id("b"), "b:4041".into()).unwrap();
    assert!(a.commit_index() < index, "appended, not yet committed");
    let next = a.next_deadline();
    a.tick(next);
    assert_eq!(
        a.commit_index(),
        index,
        "committed at the next tick without b"
    );
}

#[test]
fn append_entries_that_would_truncate_committed_entries_is_refused() {
    let a = leader_a();
    let mut b = node("b");
    let replicate = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: a.log().entries().to_vec(),
        leader_commit: 2,
        round: 1,
    };
    b.step(ms(2002), msg("a", "b", 1, replicate)).unwrap();
    assert_eq!(b.commit_index(), 2);
    let bad = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: vec![Entry {
            index: 2,
            term: Term(3),
            payload: Payload::Noop,
        }],
        leader_commit: 2,
        round: 1,
    };
    let err = b.step(ms(2003), msg("c", "b", 3, bad)).unwrap_err();
    assert_eq!(err.metric_label(), "truncates_committed");
    assert_eq!(b.log().term_at(2), Some(Term(1)));
}

#[test]
fn invalid_timing_settings_are_refused_with_what_to_fix() {
    let bad = Config {
        election_timeout_min: Duration::from_millis(300),
        election_timeout_max: Duration::from_millis(150),
        ..Config::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(ConfigError::TimeoutRange { .. })
    ));
    let bad = Config {
        heartbeat_interval: Duration::from_millis(150),
        ..Config::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("heartbeat"));
    assert!(Config::default().validate().is_ok());
}

#[test]
fn majorities_of_configurations_that_differ_by_one_voter_intersect() {
    let abc = three_voters();
    let mut abcd = abc.clone();
    abcd.voters.insert(id("d"), "d".into());
    assert!(!abc.has_disjoint_majority_with(&abcd));
    let mut de = Configuration::default();
    de.voters.insert(id("d"), "d".into());
    de.voters.insert(id("e"), "e".into());
    assert!(abc.has_disjoint_majority_with(&de));
    let mut ab_de =
        Configuration::with_voters([(id("a"), String::new()), (id("b"), String::new())]);
    ab_de.voters.insert(id("d"), "d".into());
    ab_de.voters.insert(id("e"), "e".into());
    assert!(
        abc.has_disjoint_majority_with(&ab_de),
        "two voters changed at once"
    );
}

#[test]
fn an_installed_snapshot_commits_no_further_than_its_own_index() {
    // c holds a term-2 entry at 4 that never committed; the leader of term 3
    // sends a snapshot up to 3 with commit 4. Entry 4 is unverified.
    let mut c = node("c");
    let entries = vec![
        Entry {
            index: 2,
            term: Term(1),
            payload: Payload::Noop,
        },
        Entry {
            index: 3,
            term: Term(1),
            payload: Payload::Noop,
        },
        Entry {
            index: 4,
            term: Term(2),
            payload: Payload::Noop,
        },
    ];
    let append = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries,
        leader_commit: 3,
        round: 1,
    };
    c.step(ms(2000), msg("b", "c", 2, append)).unwrap();
    assert_eq!(c.commit_index(), 3);
    let snapshot = Snapshot {
        last_index: 3,
        last_term: Term(1),
        config: three_voters(),
    };
    let install = MessageBody::InstallSnapshot {
        snapshot,
        leader_commit: 4,
        round: 2,
    };
    c.step(ms(2100), msg("a", "c", 3, install)).unwrap();
    assert_eq!(
        c.commit_index(),
        3,
        "entry 4 (term 2) was never checked against a's log"
    );
}

#[test]
fn append_entries_with_falling_or_future_terms_or_overflowing_indexes_is_refused() {
    let mut b = node("b");
    let bad_terms = [
        vec![
            Entry {
                index: 2,
                term: Term(2),
                payload: Payload::Noop,
            },
            Entry {
                index: 3,
                term: Term(1),
                payload: Payload::Noop,
            },
        ],
        vec![Entry {
            index: 2,
            term: Term(9),
            payload: Payload::Noop,
        }],
    ];
    for entries in bad_terms {
        let append = MessageBody::AppendEntries {
            prev_log_index: 1,
            prev_log_term: Term(0),
            entries,
            leader_commit: 1,
            round: 1,
        };
        let err = b.step(ms(2000), msg("a", "b", 2, append)).unwrap_err();
        assert_eq!(err.metric_label(), "malformed_entries");
    }
    let overflow = MessageBody::AppendEntries {
        prev_log_index: u64::MAX,
        prev_log_term: Term(0),
        entries: vec![Entry {
            index: 0,
            term: Term(1),
            payload: Payload::Noop,
        }],
        leader_commit: 1,
        round: 1,
    };
    let err = b.step(ms(2000), msg("a", "b", 2, overflow)).unwrap_err();
    assert_eq!(err.metric_label(), "malformed_entries");
    let huge = MessageBody::InstallSnapshot {
        snapshot: Snapshot {
            last_index: u64::MAX,
            last_term: Term(1),
            config: three_voters(),
        },
        leader_commit: 1,
        round: 1,
    };
    let err = b.step(ms(2000), msg("a", "b", 2, huge)).unwrap_err();
    assert_eq!(err.metric_label(), "malformed_snapshot");
    assert_eq!(b.log().last_index(), 1, "nothing was stored");
    assert_eq!(b.commit_index(), 1);
}

#[test]
fn timeout_now_from_a_higher_term_only_moves_the_term() {
    let mut b = node("b");
    b.step(ms(4000), msg("c", "b", 5, MessageBody::TimeoutNow))
        .unwrap();
    assert_eq!(b.term(), Term(5));
    assert_eq!(
        b.role(),
        Role::Follower,
        "no election without the term's leader"
    );
}

#[test]
fn a_second_transfer_request_keeps_the_first_target_and_deadline() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    let first = a.transfer_leadership(ms(2002), Some(id("b"))).unwrap();
    let second = a.transfer_leadership(ms(2100), Some(id("c"))).unwrap();
    assert_eq!((first, second), (id("b"), id("b")));
    a.tick(ms(2002) + Duration::from_millis(150));
    assert_eq!(a.role(), Role::Follower, "the first deadline still holds");
}

#[test]
fn a_second_leader_in_the_same_term_is_refused() {
    let mut b = node("b");
    let hb = |round| MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: vec![],
        leader_commit: 1,
        round,
    };
    b.step(ms(3000), msg("a", "b", 1, hb(1))).unwrap();
    let err = b.step(ms(3001), msg("c", "b", 1, hb(2))).unwrap_err();
    assert_eq!(err.metric_label(), "second_leader");
    assert_eq!(b.leader(), Some(&id("a")));
}

/// `b` following leader `a` of term 1, having heard a round at `t`.
fn follower_b_of_a(t: Time) -> RaftCore {
    let mut b = node("b");
    b.step(
        t,
        msg(
            "a",
            "b",
            1,
            MessageBody::AppendEntries {
                prev_log_index: 1,
                prev_log_term: Term(0),
                entries: vec![],
                leader_commit: 1,
                round: 1,
            },
        ),
    )
    .unwrap();
    b.take_ready();
    b
}

#[test]
fn a_follower_that_loses_its_leaders_connection_campaigns_within_one_heartbeat() {
    let t = ms(5000);
    let mut b = follower_b_of_a(t);
    let lost_at = t + Duration::from_millis(10);
    b.leader_connection_lost(lost_at, &id("a"));
    let due = b.next_deadline();
    assert!(due >= lost_at && due < lost_at + Config::default().heartbeat_interval);
    b.tick(due);
    assert_eq!(b.role(), Role::PreCandidate);
    // And it grants a peer's pre-vote inside what was its stickiness window.
    let mut c = follower_b_of_a(t);
    c.leader_connection_lost(lost_at, &id("a"));
    let pre_vote = MessageBody::PreVote {
        last_log_index: 1,
        last_log_term: Term(1),
    };
    c.step(lost_at, msg("c", "b", 2, pre_vote)).unwrap();
    assert_eq!(
        c.take_ready().messages[0].body,
        MessageBody::PreVoteResponse { granted: true }
    );
}

#[test]
fn a_connection_end_of_anyone_but_the_leader_changes_nothing() {
    let t = ms(5000);
    let mut b = follower_b_of_a(t);
    let due = b.next_deadline();
    b.leader_connection_lost(t + Duration::from_millis(10), &id("c"));
    assert_eq!(b.next_deadline(), due);
    let pre_vote = MessageBody::PreVote {
        last_log_index: 1,
        last_log_term: Term(1),
    };
    b.step(t + Duration::from_millis(20), msg("c", "b", 2, pre_vote))
        .unwrap();
    assert_eq!(
        b.take_ready().messages[0].body,
        MessageBody::PreVoteResponse { granted: false },
        "still sticky to the live leader"
    );
}

#[test]
fn a_vote_answer_carries_how_long_ago_the_voter_heard_its_leader() {
    let t = ms(5000);
    let mut b = follower_b_of_a(t);
    b.leader_connection_lost(t + Duration::from_millis(5), &id("a"));
    let vote = MessageBody::RequestVote {
        last_log_index: 1,
        last_log_term: Term(1),
        transfer: false,
    };
    b.step(t + Duration::from_millis(30), msg("c", "b", 2, vote))
        .unwrap();
    assert_eq!(
        b.take_ready().messages[0].body,
        MessageBody::RequestVoteResponse {
            granted: true,
            leader_contact_age: 30_000_000,
        }
    );
}

/// Returns `a` following c in term 1, which hands its term over to `a`
/// with TimeoutNow at `t`.
fn node_told_to_campaign_by_c(t: Time) -> RaftCore {
    let mut a = node("a");
    let round = MessageBody::AppendEntries {
        prev_log_index: 1,
        prev_log_term: Term(0),
        entries: vec![],
        leader_commit: 1,
        round: 1,
    };
    a.step(t, msg("c", "a", 1, round)).unwrap();
    a.step(t, msg("c", "a", 1, MessageBody::TimeoutNow))
        .unwrap();
    a
}

/// Elects `a` in term 2 at `t` with b's vote, b having heard a leader
/// `age_ms` before; its first round goes out at `t`.
fn leader_a_after_vote_of_age(t: Time, age_ms: u64, transfer: bool) -> RaftCore {
    let mut a = if transfer {
        node_told_to_campaign_by_c(t)
    } else {
        let mut a = node("a");
        a.tick(t);
        a.step(
            t,
            msg("b", "a", 1, MessageBody::PreVoteResponse { granted: true }),
        )
        .unwrap();
        a
    };
    assert_eq!(a.role(), Role::Candidate);
    let term = a.term().0;
    a.step(
        t,
        msg(
            "b",
            "a",
            term,
            MessageBody::RequestVoteResponse {
                granted: true,
                leader_contact_age: age_ms * 1_000_000,
            },
        ),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Leader);
    a.take_ready();
    a
}

#[test]
fn a_new_leader_takes_no_lease_before_its_voters_stickiness_has_surely_ended() {
    let t = ms(9000);
    let mut a = leader_a_after_vote_of_age(t, 20, false);
    let term = a.term().0;
    // The first round (sent at t) is acknowledged by both: no lease, since
    // b heard a leader only 20 ms ago.
    a.step(t + Duration::from_millis(1), ack("b", term, 2, t))
        .unwrap();
    a.step(t + Duration::from_millis(1), ack("c", term, 2, t))
        .unwrap();
    assert!(!a.has_lease(t + Duration::from_millis(1)));
    // Regular rounds before b's window has surely closed earn nothing.
    for round in [
        t + Duration::from_millis(50),
        t + Duration::from_millis(100),
    ] {
        assert_eq!(a.next_deadline(), round);
        a.tick(round);
        a.take_ready();
        a.step(round, ack("b", term, 2, round)).unwrap();
        assert!(!a.has_lease(round));
    }
    // The next round goes out the moment it has: (150 − 20) ms / (1 − 0.01).
    let expected = t + Duration::from_millis(130).div_f64(0.99);
    assert_eq!(a.next_deadline(), expected);
    a.tick(expected);
    let ready = a.take_ready();
    assert_eq!(
        sent_kinds(&ready),
        vec![
            ("b".to_string(), "append_entries"),
            ("c".to_string(), "append_entries")
        ]
    );
    a.step(expected, ack("b", term, 2, expected)).unwrap();
    assert!(a.has_lease(expected));
}

#[test]
fn a_transfer_winner_holds_its_lease_one_round_trip_after_winning_with_no_save_between() {
    let t = ms(9000);
    let mut a = node_told_to_campaign_by_c(t);
    assert!(
        a.take_ready().hard_state.is_some(),
        "term and vote are saved"
    );
    let vote = MessageBody::RequestVoteResponse {
        granted: true,
        leader_contact_age: 0,
    };
    a.step(t, msg("b", "a", 2, vote)).unwrap();
    assert_eq!(a.role(), Role::Leader);
    // The first round is a bare heartbeat that needs no save, here or on
    // the followers: the no-op comes after it.
    let won = a.take_ready();
    assert!(won.hard_state.is_none(), "nothing to save before the round");
    assert_eq!(won.messages.len(), 2);
    for m in &won.messages {
        assert!(
            matches!(&m.body, MessageBody::AppendEntries { entries, .. } if entries.is_empty()),
            "{m:?}"
        );
    }
    assert_eq!(a.log().last_index(), 1);
    let at = t + Duration::from_millis(1);
    a.step(at, ack("b", 2, 1, t)).unwrap();
    assert!(a.has_lease(at));
    let leased = a.take_ready();
    assert!(leased.hard_state.is_none() && leased.leadership.is_some());
    assert_eq!(
        a.propose_add_learner(NodeId::new("d", 1), "d:4041".into()),
        Err(ProposeError::TermNotCommitted)
    );
    // The no-op follows at once, in a round of its own.
    assert_eq!(a.next_deadline(), at);
    a.tick(at);
    let noop = a.take_ready();
    assert!(noop.hard_state.is_some(), "the no-op is saved");
    assert_eq!(a.log().last_index(), 2);
    assert!(noop.messages.iter().all(|m| matches!(
        &m.body,
        MessageBody::AppendEntries { entries, .. } if entries.len() == 1
    )));
    a.step(at, ack("b", 2, 2, at)).unwrap();
    assert_eq!(a.commit_index(), 2);
    assert!(a
        .propose_add_learner(NodeId::new("d", 1), "d:4041".into())
        .is_ok());
}

#[test]
fn a_transfer_campaign_needs_no_wait_for_the_old_lease() {
    let t = ms(9000);
    let mut a = leader_a_after_vote_of_age(t, 0, true);
    let term = a.term().0;
    a.step(t, ack("b", term, 2, t)).unwrap();
    assert!(a.has_lease(t), "the old leader forfeited its lease");
}

// ----- retiring (SIGTERM): never lead again --------------------------------

#[test]
fn a_retiring_follower_never_starts_a_pre_vote_at_its_election_timeout() {
    let mut b = node("b");
    b.retire(ms(1000));
    b.tick(ms(5000));
    assert_eq!(b.role(), Role::Follower);
    assert_eq!(b.term(), Term(0));
    assert!(b.take_ready().messages.is_empty(), "no pre-vote sent");
    assert!(b.next_deadline() > ms(5000), "the timer was re-armed");
}

#[test]
fn a_pre_candidate_that_retires_gives_up_and_never_asks_for_votes() {
    let mut a = node("a");
    a.tick(ms(2000));
    assert_eq!(a.role(), Role::PreCandidate);
    a.take_ready();
    a.retire(ms(2001));
    assert_eq!(a.role(), Role::Follower);
    a.step(
        ms(2002),
        msg("b", "a", 1, MessageBody::PreVoteResponse { granted: true }),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Follower);
    assert_eq!(a.term(), Term(0), "no election started");
    assert!(a.take_ready().messages.is_empty());
}

#[test]
fn a_candidate_that_retires_refuses_the_votes_that_would_make_it_leader() {
    let mut a = node("a");
    a.tick(ms(2000));
    a.step(
        ms(2000),
        msg("b", "a", 1, MessageBody::PreVoteResponse { granted: true }),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Candidate);
    a.take_ready();
    a.retire(ms(2001));
    a.step(
        ms(2002),
        msg(
            "b",
            "a",
            1,
            MessageBody::RequestVoteResponse {
                granted: true,
                leader_contact_age: LONG_AGO,
            },
        ),
    )
    .unwrap();
    assert_eq!(a.role(), Role::Follower);
    assert!(a.lease_until().is_none());
}

#[test]
fn a_retiring_follower_answers_timeout_now_from_its_leader_with_leave() {
    let t = ms(4000);
    let mut b = follower_b_of_a(t);
    b.retire(t);
    b.step(t, msg("a", "b", 1, MessageBody::TimeoutNow))
        .unwrap();
    assert_eq!(b.role(), Role::Follower);
    assert_eq!(b.term(), Term(1), "no campaign");
    let ready = b.take_ready();
    assert_eq!(sent_kinds(&ready), vec![("a".to_string(), "leave")]);
}

#[test]
fn a_retiring_node_still_votes_for_another_candidate() {
    let mut c = node("c");
    c.retire(ms(1000));
    c.step(
        ms(5000),
        msg(
            "b",
            "c",
            1,
            MessageBody::RequestVote {
                last_log_index: 1,
                last_log_term: Term(0),
                transfer: false,
            },
        ),
    )
    .unwrap();
    assert!(matches!(
        c.take_ready().messages[0].body,
        MessageBody::RequestVoteResponse { granted: true, .. }
    ));
}

#[test]
fn a_leader_whose_transfer_target_refuses_hands_over_to_the_next_voter_at_once() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    a.step(ms(2001), ack("c", 1, 2, ms(2000))).unwrap();
    a.retire(ms(2002));
    let first = a.transfer_leadership(ms(2002), None).unwrap();
    a.take_ready();
    a.step(ms(2003), msg(&first.name, "a", 1, MessageBody::Leave))
        .unwrap();
    assert!(!a.is_transferring(), "the refusal ends the transfer");
    assert_eq!(a.role(), Role::Leader);
    let second = a.transfer_leadership(ms(2003), None).unwrap();
    assert_ne!(second, first, "a retiring voter is no target");
    let ready = a.take_ready();
    assert_eq!(
        sent_kinds(&ready),
        vec![(second.name.to_string(), "timeout_now")]
    );
}

#[test]
fn a_retiring_leader_with_every_other_voter_leaving_abdicates_and_tells_every_member() {
    let mut a = leader_a();
    a.retire(ms(2001));
    a.step(ms(2001), msg("b", "a", 1, MessageBody::Leave))
        .unwrap();
    a.step(ms(2001), msg("c", "a", 1, MessageBody::Leave))
        .unwrap();
    assert!(a.others_retiring());
    assert_eq!(
        a.transfer_leadership(ms(2002), None),
        Err(TransferError::NoTarget)
    );
    a.take_ready();
    assert!(a.abdicate(ms(2002)));
    assert_eq!(a.role(), Role::Follower);
    let ready = a.take_ready();
    let mut sent = sent_kinds(&ready);
    sent.sort();
    assert_eq!(
        sent,
        vec![("b".to_string(), "leave"), ("c".to_string(), "leave")]
    );
    // It never campaigns afterwards.
    a.tick(ms(9000));
    assert_eq!(a.role(), Role::Follower);
}

#[test]
fn a_leader_that_is_not_retiring_does_not_abdicate() {
    let mut a = leader_a();
    assert!(!a.abdicate(ms(2001)));
    assert_eq!(a.role(), Role::Leader);
}

#[test]
fn a_follower_whose_leader_sends_leave_learns_the_group_is_going_away() {
    let t = ms(4000);
    let mut b = follower_b_of_a(t);
    assert!(!b.leader_abdicated());
    // Leave from another follower means nothing to a follower.
    b.step(t, msg("c", "b", 1, MessageBody::Leave)).unwrap();
    assert!(!b.leader_abdicated());
    b.step(t, msg("a", "b", 1, MessageBody::Leave)).unwrap();
    assert!(b.leader_abdicated());
    assert!(b.others_retiring(), "a and c both said so");
}

#[test]
fn retiring_peers_outside_the_configuration_are_not_kept() {
    let mut b = node("b");
    b.note_retiring(&id("z"));
    b.note_retiring(&NodeId::new("c", 2));
    assert!(!b.others_retiring());
    b.note_retiring(&id("a"));
    b.note_retiring(&id("c"));
    assert!(b.others_retiring());
}

#[test]
fn a_node_that_leaves_without_a_known_leader_tells_every_other_voter() {
    let mut b = node("b");
    b.retire(ms(1000));
    b.take_ready();
    assert!(!b.leave(), "no leader known");
    let mut sent = sent_kinds(&b.take_ready());
    sent.sort();
    assert_eq!(
        sent,
        vec![("a".to_string(), "leave"), ("c".to_string(), "leave")]
    );
}

#[test]
fn an_abdicating_leader_also_tells_the_members_it_just_removed() {
    let mut a = leader_a();
    a.step(ms(2001), ack("b", 1, 2, ms(2000))).unwrap();
    a.step(ms(2001), ack("c", 1, 2, ms(2000))).unwrap();
    a.step(ms(2001), msg("c", "a", 1, MessageBody::Leave))
        .unwrap();
    a.tick(ms(2050));
    assert!(!a.configuration().0.contains(&id("c")), "c removed");
    a.take_ready();
    a.retire(ms(2051));
    a.step(ms(2052), msg("b", "a", 1, MessageBody::Leave))
        .unwrap();
    assert!(a.transfer_leadership(ms(2052), None).is_err());
    assert!(a.abdicate(ms(2052)));
    let mut sent = sent_kinds(&a.take_ready());
    sent.sort();
    assert_eq!(
        sent,
        vec![("b".to_string(), "leave"), ("c".to_string(), "leave")]
    );
}

#[test]
fn a_leader_that_stepped_down_in_this_term_does_not_tell_its_followers_it_leaves() {
    let mut a = leader_a();
    a.retire(ms(2001));
    a.transfer_leadership(ms(2001), None).unwrap();
    a.take_ready();
    // The target never takes over: a steps down at the transfer deadline.
    a.tick(ms(2001) + Duration::from_millis(150));
    assert_eq!(a.role(), Role::Follower);
    assert!(!a.leave());
    assert!(
        a.take_ready().messages.is_empty(),
        "a Leave from their leader would tell b and c the group is going away"
    );
}
