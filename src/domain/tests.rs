//! Table-driven tests per rule, the worked example of `domain.md`, and a
//! property test over random event sequences.
use proptest::prelude::*;

use super::*;
use crate::testing::sequences::{self, InvariantCheck};
use crate::testing::EventScript as Script;

fn lid(s: &str) -> LifecycleId {
    LifecycleId::parse(s).unwrap()
}

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

fn status(book: &LifecycleBook, id: &str) -> (IdType, IdStatus, Option<String>) {
    let owner = book.owner_of(&lid(id)).expect("id is bound");
    let r = book.order(owner).unwrap().get(&lid(id)).unwrap();
    (
        r.id_type,
        r.status,
        r.replaced_by.as_ref().map(|x| x.to_string()),
    )
}

fn run(book: &mut LifecycleBook, events: &[OrderEvent]) -> Vec<Result<Recorded, Rejection>> {
    events.iter().map(|e| book.process(e)).collect()
}

use IdStatus::*;
use IdType::{
    CancelId, CloseId, ModifyId, StoplossCancelId, StoplossId, TakeprofitCancelId, TakeprofitId,
};

#[test]
fn worked_example_from_the_domain_page() {
    let mut s = Script::new("123456789");
    let mut book = LifecycleBook::new();
    // (event, expected rows after it: id, type, status, replaced_by)
    type Row = (&'static str, IdType, IdStatus, Option<&'static str>);
    let steps: Vec<(OrderEvent, Vec<Row>)> = vec![
        (
            s.place(),
            vec![("123456789", IdType::OrderId, Active, None)],
        ),
        (s.sl("SL111"), vec![("SL111", StoplossId, Active, None)]),
        (
            s.cancel_sl("SLC444", None),
            vec![
                ("SLC444", StoplossCancelId, Active, None),
                ("SL111", StoplossId, Cancelled, None),
            ],
        ),
        (s.sl("SL777"), vec![("SL777", StoplossId, Active, None)]),
        (
            s.sl("SL888"),
            vec![
                ("SL777", StoplossId, Replaced, Some("SL888")),
                ("SL888", StoplossId, Active, None),
            ],
        ),
        (
            s.confirm("SL777", "EXECUTED"),
            vec![("SL777", StoplossId, Executed, Some("SL888"))],
        ),
        (
            s.confirm("SLC444", "CANCELLED"),
            vec![
                ("SLC444", StoplossCancelId, Executed, None),
                ("SL111", StoplossId, Cancelled, None),
            ],
        ),
    ];
    for (i, (event, rows)) in steps.iter().enumerate() {
        let rec = book.process(event).unwrap();
        assert_eq!(rec.seq, i as u64 + 1, "sequence has no gap");
        for (id, t, st, by) in rows {
            assert_eq!(
                status(&book, id),
                (*t, *st, by.map(String::from)),
                "after step {i}: {id}"
            );
        }
    }
    for id in ["123456789", "SL111", "SLC444", "SL777", "SL888"] {
        assert_eq!(book.owner_of(&lid(id)), Some(&oid("123456789")));
    }
}

#[test]
fn r1_binding_an_id_of_another_order_is_rejected_and_changes_nothing() {
    let mut a = Script::new("A");
    let mut b = Script::new("B");
    let mut book = LifecycleBook::new();
    run(&mut book, &[a.place(), a.sl("SL1"), b.place()]);
    let before = book.order(&oid("B")).cloned();
    let err = book.process(&b.sl("SL1")).unwrap_err();
    assert_eq!(err.reason(), "id_bound_to_other_order");
    assert!(err.to_string().contains("SL1") && err.to_string().contains("order A"));
    assert_eq!(book.order(&oid("B")).cloned(), before);
    // Another order's id as a cancel target, and as a confirmation's order.
    assert_eq!(
        book.process(&b.cancel_sl("X1", Some("SL1")))
            .unwrap_err()
            .reason(),
        "id_bound_to_other_order"
    );
    let mut c = b.confirm("SL1", "EXECUTED");
    c.order_id = Some(oid("B"));
    assert_eq!(
        book.process(&c).unwrap_err().reason(),
        "id_bound_to_other_order"
    );
}

#[test]
fn r1_same_binding_again_changes_nothing_and_other_type_is_rejected() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    run(&mut book, &[s.place(), s.sl("SL1")]);
    let again = book.process(&s.sl("SL1")).unwrap();
    assert_eq!(
        (again.outcome, again.transitions.len()),
        (Outcome::Duplicate, 0)
    );
    assert_eq!(
        book.process(&s.place()).unwrap().outcome,
        Outcome::Duplicate
    );
    let err = book.process(&s.tp("SL1")).unwrap_err();
    assert_eq!(err.reason(), "id_type_conflict");
    assert!(err.to_string().contains("stoploss_id (active)"), "{err}");
}

#[test]
fn r2_one_active_id_per_type_for_every_type() {
    type Make = fn(&mut Script, &str) -> OrderEvent;
    let cases: Vec<(IdType, Make)> = vec![
        (StoplossId, |s, id| s.sl(id)),
        (TakeprofitId, |s, id| s.tp(id)),
        (ModifyId, |s, id| s.modify(id)),
        (CancelId, |s, id| s.pending_cancel(id)),
        (CloseId, |s, id| s.close(id, None, None)),
        (StoplossCancelId, |s, id| s.cancel_sl(id, None)),
        (TakeprofitCancelId, |s, id| s.cancel_tp(id, None)),
    ];
    for (t, make) in cases {
        let mut s = Script::new("A");
        let mut book = LifecycleBook::new();
        run(
            &mut book,
            &[s.place(), make(&mut s, "X1"), make(&mut s, "X2")],
        );
        assert_eq!(status(&book, "X1"), (t, Replaced, Some("X2".into())), "{t}");
        assert_eq!(status(&book, "X2"), (t, Active, None), "{t}");
    }
}

#[test]
fn r3_cancel_names_its_target_or_means_the_active_one() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    run(
        &mut book,
        &[s.place(), s.sl("SL1"), s.sl("SL2"), s.tp("TP1")],
    );
    // Named: the replaced SL1 is cancelled; the active SL2 is untouched.
    run(&mut book, &[s.cancel_sl("C1", Some("SL1"))]);
    assert_eq!(status(&book, "SL1").1, Cancelled);
    assert_eq!(status(&book, "SL2").1, Active);
    // Unnamed: the active one.
    run(
        &mut book,
        &[s.cancel_sl("C2", None), s.cancel_tp("C3", None)],
    );
    assert_eq!(status(&book, "SL2").1, Cancelled);
    assert_eq!(status(&book, "TP1").1, Cancelled);
    // Re-adding issues a new active id; cancel ids untouched.
    run(&mut book, &[s.sl("SL3")]);
    assert_eq!(status(&book, "SL3").1, Active);
    assert_eq!(status(&book, "C2").1, Active);
    // A named target of the wrong type, and an unknown one.
    assert_eq!(
        book.process(&s.cancel_sl("C4", Some("TP1")))
            .unwrap_err()
            .reason(),
        "invalid_cancel_target"
    );
    assert_eq!(
        book.process(&s.cancel_sl("C5", Some("NOPE")))
            .unwrap_err()
            .reason(),
        "unknown_lifecycle_id"
    );
}

#[test]
fn r4_close_cancels_protective_orders_with_it() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    run(&mut book, &[s.place(), s.sl("SL1"), s.tp("TP1")]);
    let rec = book
        .process(&s.close("CL1", Some("SLC1"), Some("TPC1")))
        .unwrap();
    assert_eq!(rec.outcome, Outcome::Applied);
    assert_eq!(status(&book, "CL1"), (CloseId, Active, None));
    assert_eq!(status(&book, "SLC1"), (StoplossCancelId, Active, None));
    assert_eq!(status(&book, "TPC1"), (TakeprofitCancelId, Active, None));
    assert_eq!(status(&book, "SL1").1, Cancelled);
    assert_eq!(status(&book, "TP1").1, Cancelled);
    assert_eq!(
        book.process(&s.close("CL2", Some("CL2"), None))
            .unwrap_err()
            .reason(),
        "repeated_id_in_event"
    );
}

#[test]
fn r5_pending_cancel_targets_the_order_itself() {
    let mut s = Script::new("P1");
    let mut book = LifecycleBook::new();
    run(
        &mut book,
        &[s.place(), s.modify("M1"), s.pending_cancel("CX1")],
    );
    assert_eq!(status(&book, "CX1"), (CancelId, Active, None));
    assert_eq!(status(&book, "P1").1, Active);
    run(&mut book, &[s.confirm("CX1", "CANCELED")]);
    assert_eq!(status(&book, "CX1").1, Executed);
    assert_eq!(status(&book, "P1").1, Cancelled);
}

#[test]
fn r6_confirmation_table() {
    // (id issued by, its status before, ord_status, expected status, outcome)
    type Case = (&'static str, &'static str, IdStatus, Outcome);
    let cases: Vec<Case> = vec![
        ("SL", "EXECUTED", Executed, Outcome::Applied),
        ("SL", "filled", Executed, Outcome::Applied),
        ("SL", "CANCELLED", Cancelled, Outcome::Applied),
        ("SL", "CANCELED", Cancelled, Outcome::Applied),
        ("SL", "REJECTED", Rejected, Outcome::Applied),
        ("SL", "NEW", Active, Outcome::Acknowledged),
        ("SL", "PENDING", Active, Outcome::Acknowledged),
        ("SLC", "CANCELLED", Executed, Outcome::Applied),
        ("SLC", "REJECTED", Rejected, Outcome::Applied),
        ("REPLACED", "EXECUTED", Executed, Outcome::Applied),
        ("REPLACED", "REJECTED", Rejected, Outcome::Applied),
    ];
    for (which, ord_status, expected, outcome) in cases {
        let mut s = Script::new("A");
        let mut book = LifecycleBook::new();
        run(
            &mut book,
            &[
                s.place(),
                s.sl("SL1"),
                s.sl("SL2"),
                s.cancel_sl("SLC", None),
            ],
        );
        run(&mut book, &[s.sl("SL3")]);
        let id = match which {
            "SL" => "SL3",
            "REPLACED" => "SL1",
            other => other,
        };
        let rec = book.process(&s.confirm(id, ord_status)).unwrap();
        assert_eq!(rec.outcome, outcome, "{which} {ord_status}");
        assert_eq!(status(&book, id).1, expected, "{which} {ord_status}");
    }
}

#[test]
fn r6_final_statuses_never_change() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    run(
        &mut book,
        &[s.place(), s.sl("SL1"), s.confirm("SL1", "EXECUTED")],
    );
    let dup = book.process(&s.confirm("SL1", "FILLED")).unwrap();
    assert_eq!(
        (dup.outcome, dup.transitions.len()),
        (Outcome::Duplicate, 0)
    );
    for st in ["REJECTED", "CANCELLED"] {
        let c = book.process(&s.confirm("SL1", st)).unwrap();
        assert_eq!((c.outcome, c.transitions.len()), (Outcome::Conflict, 0));
    }
    assert_eq!(status(&book, "SL1").1, Executed);
    // A cancel whose target already executed leaves the target executed.
    let rec = book.process(&s.cancel_sl("SLC1", Some("SL1"))).unwrap();
    assert_eq!(rec.transitions.len(), 1);
    run(&mut book, &[s.confirm("SLC1", "CANCELLED")]);
    assert_eq!(status(&book, "SL1").1, Executed);
    assert_eq!(status(&book, "SLC1").1, Executed);
}

#[test]
fn r7_confirmation_for_an_unknown_id_is_rejected_with_the_parking_reason() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    let err = book.process(&s.confirm("LATER", "EXECUTED")).unwrap_err();
    assert_eq!(err.reason(), "unknown_lifecycle_id");
    assert!(err.to_string().contains("LATER"));
}

#[test]
fn events_for_an_order_not_yet_placed_still_bind_their_ids() {
    let mut s = Script::new("A");
    let mut book = LifecycleBook::new();
    run(&mut book, &[s.sl("SL1"), s.place()]);
    assert_eq!(status(&book, "SL1").1, Active);
    assert_eq!(book.order(&oid("A")).unwrap().last_seq(), 2);
}

// ---------------------------------------------------------------------------
// Property test (the fuzz target `lifecycle` checks the same invariants)

proptest! {
    #[test]
    fn invariants_hold_for_random_event_sequences(
        steps in prop::collection::vec(any::<(u8, u8, u8, u8, u8)>(), 1..80)
    ) {
        let mut check = InvariantCheck::new();
        for (n, step) in steps.into_iter().enumerate() {
            check.step(&sequences::event(step, n)).map_err(TestCaseError::fail)?;
        }
        check.finish().map_err(TestCaseError::fail)?;
    }
}
