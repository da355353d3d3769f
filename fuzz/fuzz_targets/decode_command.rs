//! Fuzzes `wire::decode_command` (PROTOCOL §7 requests). Beyond "never
//! panics": what it hands on (`req_id`, `reply_to`) is bounded and valid, so
//! a reply can never be addressed to a malformed topic.
#![no_main]

use esl_agent::wire::{self, decode_command, MAX_TASK_ID};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let (req_id, reply_to) = match decode_command(data, MAX_PAYLOAD) {
        Ok(cmd) => {
            assert!(!cmd.method.is_empty() && cmd.method.len() <= 64);
            (cmd.req_id, cmd.reply_to)
        }
        Err(bad) => {
            assert!(!bad.message.is_empty());
            (bad.req_id, bad.reply_to)
        }
    };
    if let Some(r) = req_id {
        assert!(r.len() <= MAX_TASK_ID);
    }
    if let Some(r) = reply_to {
        assert!(wire::is_valid_client_id(&r));
    }
});
