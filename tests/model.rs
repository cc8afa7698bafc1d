//! Model test: random sequences of put / delete / compact / reopen / follow,
//! applied to the real store (files in a temp dir, small segments so that
//! roll-over and trimming happen) and to a `BTreeMap`. After every step the
//! store read back from disk, and a follower's hot table, must equal the model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use uload::store::record::{FLAG_FORWARD_QUERY, Link, RedirectStatus};
use uload::store::{DataDir, LogFollower, LogOp, LogOptions, Store};

#[derive(Debug, Clone)]
enum Op {
    Put {
        code: u8,
        target: u16,
        status: u8,
        forward: bool,
    },
    Delete {
        code: u8,
    },
    /// Several puts in one append call.
    Batch {
        codes: Vec<u8>,
        target: u16,
    },
    Compact,
    Reopen,
    Follow,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, any::<u16>(), 0u8..4, any::<bool>())
            .prop_map(|(code, target, status, forward)| Op::Put { code, target, status, forward }),
        3 => (0u8..24).prop_map(|code| Op::Delete { code }),
        1 => (proptest::collection::vec(0u8..24, 1..6), any::<u16>())
            .prop_map(|(codes, target)| Op::Batch { codes, target }),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        2 => Just(Op::Follow),
    ]
}

fn code(i: u8) -> String {
    // Include case and the two punctuation bytes: codes are case-sensitive.
    let alphabet = ["a", "A", "b", "B", "ab", "aB", "x-y", "x_y"];
    format!("{}{}", alphabet[(i % 8) as usize], i / 8)
}

fn link(code_i: u8, target: u16, status: u8, forward: bool) -> Link {
    let mut l = Link::new(&code(code_i), &format!("https://example.com/{target}")).unwrap();
    l.status = [
        RedirectStatus::MovedPermanently,
        RedirectStatus::Found,
        RedirectStatus::TemporaryRedirect,
        RedirectStatus::PermanentRedirect,
    ][status as usize % 4];
    l.flags = if forward { FLAG_FORWARD_QUERY } else { 0 };
    l.created_at_ms = 1_700_000_000_000 + target as u64;
    l
}

fn assert_same(model: &BTreeMap<String, Link>, view: &uload::store::TableView, what: &str) {
    let got: Vec<Link> = view.iter().map(|l| l.unwrap().to_link().unwrap()).collect();
    let want: Vec<Link> = model.values().cloned().collect();
    assert_eq!(got, want, "{what}: iteration");
    assert_eq!(view.len(), model.len() as u64, "{what}: len");
    for i in 0..24 {
        let c = code(i);
        let got = view.get(c.as_bytes()).map(|l| l.to_link().unwrap());
        assert_eq!(got.as_ref(), model.get(&c), "{what}: get {c}");
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions { segment_bytes: 400 };
    let mut store = Some(Store::open(dir.path(), opts.clone()).unwrap());
    let mut follower = LogFollower::open(dir.path()).unwrap();
    let table = follower.table();
    let mut model: BTreeMap<String, Link> = BTreeMap::new();
    for (step, op) in ops.into_iter().enumerate() {
        let s = store.as_ref().unwrap();
        match op {
            Op::Put {
                code: c,
                target,
                status,
                forward,
            } => {
                let l = link(c, target, status, forward);
                s.append(&[LogOp::Put(l.clone())]).unwrap();
                model.insert(l.code.clone(), l);
            }
            Op::Delete { code: c } => {
                s.append(&[LogOp::Delete(code(c))]).unwrap();
                model.remove(&code(c));
            }
            Op::Batch { codes, target } => {
                let links: Vec<Link> = codes.iter().map(|&c| link(c, target, 1, false)).collect();
                let ops: Vec<LogOp> = links.iter().cloned().map(LogOp::Put).collect();
                s.append(&ops).unwrap();
                for l in links {
                    model.insert(l.code.clone(), l);
                }
            }
            Op::Compact => {
                s.compact().unwrap();
            }
            Op::Reopen => {
                // The old writer (and its lock) must be gone before the new one opens.
                drop(store.take());
                store = Some(Store::open(dir.path(), opts.clone()).unwrap());
            }
            Op::Follow => {
                follower.poll_once();
                assert_same(&model, &table.load(), &format!("step {step}: follower"));
            }
        }
        let view = DataDir::new(dir.path()).load_view(true).unwrap();
        assert_same(
            &model,
            &view,
            &format!("step {step}: {op_name}", op_name = step),
        );
    }
    // A fresh follower and a final poll of the old one both agree.
    follower.poll_once();
    assert_same(&model, &table.load(), "final follower");
    assert_same(
        &model,
        &LogFollower::open(dir.path()).unwrap().table().load(),
        "fresh follower",
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn store_agrees_with_btreemap(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
