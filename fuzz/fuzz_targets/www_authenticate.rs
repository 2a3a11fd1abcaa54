//! A `WWW-Authenticate` value: any bytes a header value may hold.
//!
//! Parsing never panics, a value over the length limit gives nothing, the accessors agree
//! with `param` whatever the case of the name asked for, and parsing twice gives the same
//! challenge.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_token_refresh::Challenge;

/// The longest value the parser reads; longer ones give no challenge.
const MAX_CHALLENGE_LEN: usize = 8 * 1024;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };

    let challenge = Challenge::bearer_from_value(&value);

    let Some(challenge) = challenge else {
        return;
    };
    assert!(
        data.len() <= MAX_CHALLENGE_LEN,
        "an over-long value was parsed"
    );
    assert_eq!(challenge.error(), challenge.param("ERROR"));
    assert_eq!(
        challenge.error_description(),
        challenge.param("Error_Description")
    );
    assert_eq!(challenge.scope(), challenge.param("scope"));
    assert_eq!(challenge.realm(), challenge.param("Realm"));
    let _ = challenge.param("");
    let _ = format!("{challenge:?}");
    assert_eq!(
        Challenge::bearer_from_value(&value).as_ref(),
        Some(&challenge)
    );
});
