//! What the demo's back end sends: a seeded list of price changes with a
//! few deliberately malformed messages mixed in, and their JSON.
//!
//! Pure data, no I/O: the plan is made before the run (so `--seed` repeats
//! it) and each message is rendered when it is sent, because `issued_at` is
//! the send time.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Every `MALFORMED_EVERY`-th message is broken on purpose, to show the
/// agent acking bad input `rejected` with a detail instead of stalling.
pub(crate) const MALFORMED_EVERY: usize = 50;

/// Products on the shelf, with a list price in fen (1/100 CNY).
const PRODUCTS: &[(&str, u64)] = &[
    ("Milk 1L", 990),
    ("Yoghurt 4x100g", 1250),
    ("Jasmine rice 5kg", 4990),
    ("Soy sauce 500ml", 1380),
    ("Eggs 10 pcs", 1590),
    ("Green tea 330ml", 350),
    ("Instant noodles 5x", 1290),
    ("Apples 1kg", 1280),
    ("Dumplings 1kg", 3290),
    ("Peanut oil 1.8L", 5990),
    ("Toothpaste 120g", 1690),
    ("Tissues 3x100", 1990),
];

/// How a malformed message is broken. All but `NotJson` still carry a
/// readable `task_id`, so their `rejected` ack names the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flaw {
    NotJson,
    MissingIssuedAt,
    WrongVersion,
    BadTagId,
}

const FLAWS: [Flaw; 4] = [
    Flaw::MissingIssuedAt,
    Flaw::NotJson,
    Flaw::BadTagId,
    Flaw::WrongVersion,
];

/// One message of the plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Planned {
    Task(PriceChange),
    Malformed { task_id: String, flaw: Flaw },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PriceChange {
    pub(crate) task_id: String,
    pub(crate) tag_id: String,
    /// Increases per tag in sending order (PROTOCOL §4 rule 5).
    pub(crate) seq: u64,
    pub(crate) product: &'static str,
    pub(crate) price: String,
}

impl Planned {
    /// The `task_id` the agent can read back from this message, if any.
    pub(crate) fn task_id(&self) -> Option<&str> {
        match self {
            Planned::Task(t) => Some(&t.task_id),
            Planned::Malformed {
                flaw: Flaw::NotJson,
                ..
            } => None,
            Planned::Malformed { task_id, .. } => Some(task_id),
        }
    }

    /// The message as published, with `issued_at` = `now_ms`.
    pub(crate) fn payload(&self, now_ms: u64, ttl_ms: u64) -> Vec<u8> {
        let value = match self {
            Planned::Task(t) => json!({
                "v": 1, "task_id": t.task_id, "tag_id": t.tag_id, "seq": t.seq,
                "issued_at": now_ms, "ttl_ms": ttl_ms,
                "content": {"name": t.product, "price": t.price, "currency": "CNY"},
            }),
            Planned::Malformed { task_id, flaw } => {
                let mut v = json!({
                    "v": 1, "task_id": task_id, "tag_id": "SIM000000", "issued_at": now_ms,
                    "content": {"name": "Mystery box", "price": "0.00", "currency": "CNY"},
                });
                match flaw {
                    // A back end that died mid-write: cut-off JSON.
                    Flaw::NotJson => {
                        let text = v.to_string();
                        return text.as_bytes()[..text.len() / 2].to_vec();
                    }
                    Flaw::MissingIssuedAt => {
                        if let Some(fields) = v.as_object_mut() {
                            fields.remove("issued_at");
                        }
                    }
                    Flaw::WrongVersion => v["v"] = json!(2),
                    Flaw::BadTagId => v["tag_id"] = json!("shelf 7/left"),
                }
                v
            }
        };
        value.to_string().into_bytes()
    }
}

/// `count` messages for tags `tag_ids`, reproducible from `seed`.
pub(crate) fn make(count: usize, tag_ids: &[String], seed: u64) -> Vec<Planned> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut seqs = vec![0u64; tag_ids.len()];
    let mut malformed = 0;
    (1..=count)
        .map(|n| {
            let task_id = format!("t-demo-{n:06}");
            if n % MALFORMED_EVERY == 0 {
                malformed += 1;
                return Planned::Malformed {
                    task_id,
                    flaw: FLAWS[(malformed - 1) % FLAWS.len()],
                };
            }
            let tag = rng.gen_range(0..tag_ids.len());
            seqs[tag] += 1;
            let (product, list_price) = PRODUCTS[rng.gen_range(0..PRODUCTS.len())];
            // A discount of up to 30 %, rounded to whole fen.
            let fen = list_price * rng.gen_range(70..=100) / 100;
            Planned::Task(PriceChange {
                task_id,
                tag_id: tag_ids[tag].clone(),
                seq: seqs[tag],
                product,
                price: format!("{}.{:02}", fen / 100, fen % 100),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_task;

    #[test]
    fn tasks_decode_and_malformed_messages_are_rejected_for_their_flaw() {
        let tags: Vec<String> = (0..4).map(|i| format!("SIM{i:06}")).collect();
        let plan = make(200, &tags, 7);
        assert_eq!(plan, make(200, &tags, 7), "the seed repeats the plan");
        let mut flaws = Vec::new();
        for p in &plan {
            match (p, decode_task(&p.payload(1_000, 4_000), 65_536)) {
                (Planned::Task(t), Ok(task)) => {
                    assert_eq!(
                        (task.task_id, task.tag_id, task.seq),
                        (t.task_id.clone(), t.tag_id.clone(), t.seq)
                    );
                }
                (Planned::Malformed { flaw, .. }, Err(r)) => {
                    assert_eq!(r.task_id.as_deref(), p.task_id(), "{flaw:?}: {}", r.detail);
                    flaws.push(*flaw);
                }
                (p, other) => panic!("{p:?} decoded as {other:?}"),
            }
        }
        assert_eq!(flaws, FLAWS.to_vec());
    }
}
