use super::*;
use std::collections::BTreeMap;

#[test]
fn every_default_fits_its_own_rules() {
    for s in SETTINGS {
        if !s.default.is_empty() {
            assert_eq!(s.check(s.default), Ok(()), "{}", s.name);
        }
    }
    let mut names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), SETTINGS.len(), "unique names");
}

#[test]
fn setting_urls_take_no_user_and_password() {
    for name in ["notify.webhook_url", "oauth.token_url"] {
        let e = check(name, "https://user:pw@hooks.example/T/B/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without user:password@"), "{e}");
        if SECRET.contains(&name) {
            assert!(!e.contains("pw@"), "a secret refused is not repeated: {e}");
        }
        assert!(check(name, "https://hooks.example/T/B/x?token=1").is_ok());
    }
}

#[test]
fn secrets_are_masked_and_never_repeated_in_errors() {
    let e = check(
        "notify.webhook_url",
        "https://hooks.slack.com/services/T0/B0/sekrit value",
    )
    .unwrap_err();
    assert!(!e.to_string().contains("sekrit"), "{e}");
    assert_eq!(
        mask("https://hooks.slack.com/services/T0/B0/sekrit"),
        "https://hooks.slack.com/…"
    );
    assert_eq!(
        mask("https://user:pw@example.com:8443/x?token=1"),
        "https://example.com:8443/…"
    );
    assert_eq!(mask("whsec_abcdef"), "…");
    for n in SECRET {
        assert!(is_control_plane_only(n), "{n}");
    }
    assert_eq!(parse_percents("100, 80,80%"), Some(vec![80, 100]));
    assert_eq!(parse_percents("0"), None);
    assert_eq!(parse_percents("101"), None);
    assert_eq!(parse_percents(""), None);
    assert!(check("notify.budget_thresholds", "50,90,100").is_ok());
    assert!(check("notify.budget_thresholds", "50,x").is_err());
}

#[test]
fn typos_bad_values_and_overrides() {
    let e = check("retry.max_attempt", "3").unwrap_err();
    assert!(e.to_string().contains("did you mean retry.max_attempts?"), "{e}");
    let e = check("retry.max_attempts", "three").unwrap_err();
    assert!(e.to_string().contains("integer in 1..=20"), "{e}");
    assert!(check("retry.max_attempts", "").is_err());
    assert!(check("retry.max_attempts", "21").is_err());
    assert!(check("retry.max_attempts", "20").is_ok());
    assert!(check("unified.threshold", "95").is_ok());
    assert!(check("unified.threshold", "0").is_err());
    assert!(check("unified.threshold", &format!("0.5{}", "0".repeat(40))).is_err());
    assert!(check("models", "claude-a, claude-b").is_ok());
    assert!(check("models", "claude-*").is_err());
    assert!(check("models", &"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
    assert!(check("oauth.token_url", "http://127.0.0.1:9999/v1/oauth/token").is_ok());
    assert!(check("oauth.token_url", "ftp://example.com/").is_err());
    assert!(check("oauth.token_url", "https://").is_err());
    assert!(check("oauth.authorize_url", "https://a b/").is_err());
    assert!(check("oauth.scopes", "user:inference user:profile").is_ok());
    assert!(check("oauth.scopes", "user:inference\tx").is_err());
    assert!(check("oauth.refresh_ahead_ms", "0").is_err());
    let mut v = BTreeMap::new();
    v.insert("oauth.token_url".to_string(), "nope".to_string());
    assert_eq!(
        known("oauth.token_url").str_in(&v),
        "https://platform.claude.com/v1/oauth/token"
    );
    assert_eq!(
        check("account.main.team.cooldown.overloaded_ms", "5000").unwrap(),
        Target::Account {
            account: "main.team".into(),
            setting: known("cooldown.overloaded_ms")
        }
    );
    assert!(matches!(
        check("account.main.retry.max_attempts", "2"),
        Err(SettingError::NotPerAccount(..))
    ));
    assert!(matches!(
        check("account.main.nope", "2"),
        Err(SettingError::Unknown { .. })
    ));
}

#[test]
fn the_operations_doc_lists_every_setting() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    assert!(
        doc.contains(&markdown_table()),
        "docs/operations.md must hold this table (Settings section):\n{}",
        markdown_table()
    );
}

#[test]
fn origins_are_exact_and_refused_with_a_reason() {
    let name = "cors.allowed_origins";
    assert_eq!(parse_origins(" * ").unwrap(), AllowedOrigins::Any);
    assert_eq!(
        parse_origins("https://App.Example.com, http://localhost:5173,chrome-extension://abcdef, http://[::1]:8080")
            .unwrap(),
        AllowedOrigins::List(vec![
            "https://app.example.com".into(),
            "http://localhost:5173".into(),
            "chrome-extension://abcdef".into(),
            "http://[::1]:8080".into(),
        ])
    );
    assert!(check(name, "https://a.example, https://a.example").is_ok());
    for (bad, why) in [
        ("", "no origin given"),
        ("https://app.example.com/", "has a path"),
        ("https://app.example.com/chat", "has a path"),
        ("app.example.com", "expected scheme://host[:port]"),
        ("https://", "no valid host"),
        ("https://:8080", "no valid host"),
        ("https://a.example:0", "invalid port"),
        ("https://a.example:65536", "invalid port"),
        ("https://a.example:", "invalid port"),
        ("https://a.example:443", "default port"),
        ("http://a.example:80", "default port"),
        ("https://*.example.com", "wildcard"),
        ("*, https://a.example", "must stand alone"),
        ("https://a.example,", "empty origin"),
        ("null", "null origin"),
        ("https://user@a.example", "user name"),
        ("https://a b.example", "visible ASCII"),
        ("1http://a.example", "no valid scheme"),
        ("https://a_b.example", "no valid host"),
        ("http://[::1", "unclosed"),
    ] {
        let e = check(name, bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
        assert!(e.contains("cors.allowed_origins"), "{e}");
    }
    let long = vec!["https://a.example"; 300].join(",");
    assert!(check(name, &long).is_err(), "at most {MAX_ORIGINS_BYTES} bytes");
    // A value that no longer parses reads as the default: off.
    assert!(known(name).default.is_empty());
}

#[test]
fn reading_falls_back_to_the_default() {
    let s = known("queue.max_size");
    let mut v = BTreeMap::new();
    assert_eq!(s.u64_in(&v), 1000);
    v.insert("queue.max_size".to_string(), "garbage".to_string());
    assert_eq!(s.u64_in(&v), 1000);
    v.insert("queue.max_size".to_string(), "7".to_string());
    assert_eq!(s.u64_in(&v), 7);
    assert_eq!(known("unified.threshold").fraction_of(Some("90")), 0.9);
}

#[test]
fn the_log_sample_may_be_zero_and_other_fractions_may_not() {
    let s = known("log.success_sample");
    for ok in ["0", "0.0", "0.25", "1", "50"] {
        assert!(s.check(ok).is_ok(), "{ok}");
    }
    for bad in ["-0.1", "101", "NaN", "x"] {
        assert!(s.check(bad).is_err(), "{bad}");
    }
    assert_eq!(s.fraction_of(Some("0")), 0.0);
    assert_eq!(s.fraction_of(Some("50")), 0.5);
    // A threshold of 0 would mean "always": still refused where a fraction is asked.
    let fractions: Vec<_> = SETTINGS.iter().filter(|s| s.ty == Type::Fraction).collect();
    assert!(!fractions.is_empty());
    for f in fractions {
        assert!(f.check("0").is_err(), "{}", f.name);
    }
}
