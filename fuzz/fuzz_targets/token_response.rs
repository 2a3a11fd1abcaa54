//! A token endpoint's answer: any status, any body.
//!
//! The first three bytes are the status code, one digit each (a byte counts as its distance
//! from `0`, modulo ten, so every input has a status); the rest is the body. A seed reads as
//! `200{"access_token":"...","expires_in":3600}`. The invariants are checked by
//! `tower_token_refresh::fuzzing::token_response`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_token_refresh::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((digits, body)) = data.split_first_chunk::<3>() else {
        return;
    };
    let status = digits.iter().fold(0u16, |status, digit| {
        status * 10 + u16::from(digit.wrapping_sub(b'0') % 10)
    });

    fuzzing::token_response(status, body);
});
