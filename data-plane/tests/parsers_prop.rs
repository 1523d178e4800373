//! Property tests of what the data plane parses from clients and upstreams: nothing panics on any
//! input (session keys from headers and bodies, upstream answers and error bodies, compressed
//! bodies).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use relay_data_plane::proxy::sticky::session_key;
use relay_data_plane::proxy::usage::check_answer;
use relay_data_plane::upstream::encoding::Encoding;
use relay_data_plane::upstream::usage::Usage;

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        // Structured: JSON with the fields the parsers look at, holding anything.
        (any::<String>(), any::<String>(), any::<i64>(), any::<bool>()).prop_map(|(a, b, n, f)| {
            serde_json::json!({
                "type": if f { "message" } else { a.as_str() },
                "model": b,
                "system": [{"type": "text", "text": a, "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": b}],
                "metadata": {"user_id": format!("user_{a}_account__session_{b}")},
                "usage": {"input_tokens": n, "output_tokens": -n, "cache_creation": {"ephemeral_1h_input_tokens": n}},
                "input_tokens": n,
                "error": {"type": a},
            })
            .to_string()
            .into_bytes()
        }),
    ]
}

proptest! {
    #[test]
    fn session_keys_never_panic(body in json_like(), header in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_bytes(&header) {
            h.insert("x-claude-code-session-id", v);
        }
        let _ = session_key(&h, &body);
        let _ = session_key(&http::HeaderMap::new(), &body);
    }

    #[test]
    fn upstream_answers_never_panic(body in json_like(), messages in any::<bool>()) {
        let _ = check_answer(messages, &body);
        let _ = Usage::parse_message_body(&body);
        let _ = relay_proto::anthropic::ApiError::parse(&body);
    }

    #[test]
    fn decoders_never_panic_and_keep_their_cap(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for e in [Encoding::Gzip, Encoding::Deflate, Encoding::Brotli, Encoding::Zstd, Encoding::Identity] {
            if let Ok(out) = e.decode(&body, 4096) {
                prop_assert!(out.len() <= 4096);
            }
        }
    }
}
