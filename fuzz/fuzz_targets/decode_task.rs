//! Fuzzes `wire::decode_task`, the first code every MQTT task payload meets.
//! Properties beyond "never panics": a rejection always has a detail that
//! names a field or the payload, and an accepted task obeys PROTOCOL §4 (id
//! charsets and lengths, canonical content that re-parses to an object, a
//! 16-hex-digit hash of that content).
#![no_main]

use esl_agent::wire::{self, decode_task, MAX_TAG_ID, MAX_TASK_ID};
use libfuzzer_sys::fuzz_target;

/// A small limit, so the "over the limit" path is reached too.
const MAX_PAYLOAD: usize = 4096;

fuzz_target!(|data: &[u8]| {
    match decode_task(data, MAX_PAYLOAD) {
        Ok(task) => {
            assert!(data.len() <= MAX_PAYLOAD);
            for (id, max) in [(&task.task_id, MAX_TASK_ID), (&task.tag_id, MAX_TAG_ID)] {
                assert!(!id.is_empty() && id.len() <= max, "bad id {id:?}");
                assert!(id.chars().all(wire::is_tag_char), "bad id {id:?}");
            }
            if let Some(r) = &task.reply_to {
                assert!(wire::is_valid_client_id(r), "bad reply_to {r:?}");
            }
            let content: serde_json::Value =
                serde_json::from_str(&task.content).expect("canonical content re-parses");
            assert!(content.is_object());
            assert_eq!(wire::canonical_json(&content), task.content, "canonical is a fixed point");
            assert_eq!(task.content_hash, wire::content_hash(task.content.as_bytes()));
            assert_eq!(task.content_hash.len(), 16);
        }
        Err(rejection) => {
            assert!(!rejection.detail.is_empty());
            assert!(rejection.detail.contains(':'), "detail names no field: {}", rejection.detail);
            if let Some(id) = &rejection.task_id {
                assert!(id.len() <= MAX_TASK_ID && id.chars().all(wire::is_tag_char));
            }
            if let Some(r) = &rejection.reply_to {
                assert!(wire::is_valid_client_id(r));
            }
        }
    }
});
