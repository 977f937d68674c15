//! Loading, layering, validation and redaction of the configuration.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn defaults_match_the_contract() {
    let s = Settings::load_from(None, env(&[])).expect("defaults are valid");
    assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(s.amqp.command_queue, "gewe.add_friend.commands");
    assert_eq!(s.amqp.queue_type, QueueType::Quorum);
    assert_eq!(s.amqp.prefetch, 64);
    assert_eq!(s.amqp.delivery_limit, 10);
    assert_eq!(s.retry.initial_delay, Duration::from_millis(500));
    assert_eq!(s.retry.max_delay, Duration::from_secs(30));
    assert_eq!(s.pacing.per_app_min_interval, Duration::from_secs(1));
    assert_eq!(s.dedupe.window, Duration::from_secs(24 * 3600));
    assert_eq!(s.http.listen.port(), 8080);
    assert!(s.gewe.token.is_none());
    assert!(s.require_token().is_err());
    let c = &s.callbacks;
    assert!(!c.enabled);
    assert_eq!(c.exchange, "gewe.callbacks");
    assert_eq!(c.queue, "gewe.add_friend.callbacks");
    assert!(c.listen.is_none());
    assert!(c.secret.is_none());
    assert_eq!(c.match_window, Duration::from_secs(30 * 24 * 3600));
}

#[test]
fn callbacks_are_configured_from_the_environment() {
    let s = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__CALLBACKS__ENABLED", "true"),
            ("GEWE_WORKER__CALLBACKS__LISTEN", "0.0.0.0:8081"),
            ("GEWE_WORKER__CALLBACKS__SECRET", "cb-s3cret"),
            ("GEWE_WORKER__CALLBACKS__MATCH_WINDOW", "7d"),
        ]),
    )
    .expect("valid");
    assert!(s.callbacks.enabled);
    assert_eq!(s.callbacks.listen.map(|l| l.port()), Some(8081));
    assert_eq!(s.callbacks.match_window, Duration::from_secs(7 * 24 * 3600));
    let printed = s.redacted_json();
    assert!(!printed.contains("cb-s3cret"), "{printed}");
    assert!(printed.contains(r#""secret": "***""#), "{printed}");
    assert!(!format!("{s:?}").contains("cb-s3cret"));
}

#[test]
fn env_overrides_file_and_durations_are_human() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.toml");
    std::fs::write(
        &path,
        "[amqp]\nprefetch = 8\nqueue_type = \"classic\"\n[retry]\ninitial_delay = \"2s\"\n",
    )
    .expect("write");
    let s = Settings::load_from(
        Some(&path),
        env(&[
            ("GEWE_WORKER__AMQP__PREFETCH", "16"),
            ("GEWE_WORKER__AMQP__COMMAND_QUEUE", "q1"),
            ("GEWE_WORKER__GEWE__TOKEN", "tok-12345"),
        ]),
    )
    .expect("valid");
    assert_eq!(s.amqp.prefetch, 16);
    assert_eq!(s.amqp.queue_type, QueueType::Classic);
    assert_eq!(s.amqp.command_queue, "q1");
    assert_eq!(s.retry.initial_delay, Duration::from_secs(2));
    assert_eq!(
        s.require_token().map(|t| t.expose_secret().to_owned()).ok(),
        Some("tok-12345".into())
    );
}

#[test]
fn bad_values_name_their_key() {
    for (var, value, key) in [
        ("GEWE_WORKER__AMQP__PREFETCH", "abc", "amqp.prefetch"),
        ("GEWE_WORKER__AMQP__PREFETCH", "0", "amqp.prefetch"),
        (
            "GEWE_WORKER__RETRY__INITIAL_DELAY",
            "soon",
            "retry.initial_delay",
        ),
        ("GEWE_WORKER__AMQP__QUEUE_TYPE", "stream", "amqp.queue_type"),
        ("GEWE_WORKER__RETRY__MULTIPLIER", "0.5", "retry.multiplier"),
        ("GEWE_WORKER__GEWE__BASE_URL", "not a url", "gewe.base_url"),
        ("GEWE_WORKER__AMQP__URL", "http://x", "amqp.url"),
        ("GEWE_WORKER__HTTP__LISTEN", "nowhere", "http.listen"),
        ("GEWE_WORKER__DEDUPE__WINDOW", "2000years", "dedupe.window"),
        (
            "GEWE_WORKER__PACING__PER_APP_MIN_INTERVAL",
            "100000years",
            "pacing.per_app_min_interval",
        ),
        ("GEWE_WORKER__REDIS__URL", "http://redis", "redis.url"),
        (
            "GEWE_WORKER__CALLBACKS__ENABLED",
            "maybe",
            "callbacks.enabled",
        ),
        (
            "GEWE_WORKER__CALLBACKS__LISTEN",
            "anywhere",
            "callbacks.listen",
        ),
        ("GEWE_WORKER__CALLBACKS__SECRET", " ", "callbacks.secret"),
        ("GEWE_WORKER__CALLBACKS__QUEUE", "", "callbacks.queue"),
        (
            "GEWE_WORKER__CALLBACKS__MATCH_WINDOW",
            "0s",
            "callbacks.match_window",
        ),
    ] {
        let err = Settings::load_from(None, env(&[(var, value)]))
            .expect_err(&format!("{var}={value} must be rejected"))
            .to_string();
        assert!(
            err.contains(key),
            "{var}={value}: {err:?} does not name {key}"
        );
    }
}

#[test]
fn printed_config_hides_secrets() {
    let s = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__GEWE__TOKEN", "s3cr3t-token"),
            ("GEWE_WORKER__AMQP__URL", "amqp://u:hunter2@h:5672/%2f"),
        ]),
    )
    .expect("valid");
    let printed = s.redacted_json();
    assert!(!printed.contains("s3cr3t-token"));
    assert!(!printed.contains("hunter2"));
    assert!(printed.contains("amqp://u:***@h:5672/%2f"));
    assert!(!format!("{s:?}").contains("s3cr3t-token"));
}

#[test]
fn park_delays_come_as_a_toml_list_or_a_comma_separated_variable() {
    let none = Settings::load_from(None, env(&[])).expect("defaults");
    assert!(none.retry.park.is_empty(), "parking is off by default");
    let from_env = Settings::load_from(None, env(&[("GEWE_WORKER__RETRY__PARK", "1m,10m,1h")]))
        .expect("valid");
    assert_eq!(
        from_env.retry.park,
        [60, 600, 3600].map(Duration::from_secs).to_vec()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.toml");
    std::fs::write(&path, "[retry]\npark = [\"30s\", \"2m\"]\n").expect("write");
    let from_file = Settings::load_from(Some(&path), env(&[])).expect("valid");
    assert_eq!(
        from_file.retry.park,
        [30, 120].map(Duration::from_secs).to_vec()
    );
    assert!(from_file.redacted_json().contains(r#""park": ["#));
    for bad in [
        "soon",
        "1m,,2m",
        "0s",
        "500ms",
        "8days",
        &["1m"; 21].join(","),
    ] {
        let err = Settings::load_from(None, env(&[("GEWE_WORKER__RETRY__PARK", bad)]))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("retry.park"), "{bad}: {err}");
    }
}

#[test]
fn configuration_errors_never_print_secret_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.toml");
    // A TOML syntax error on the line that holds the password.
    std::fs::write(
        &path,
        "[amqp]\nurl = \"amqp://worker:hunter2-secret@rabbit:5672/%2f\nprefetch = 8\n",
    )
    .expect("write");
    let err = Settings::load_from(Some(&path), env(&[]))
        .expect_err("not TOML")
        .to_string();
    assert!(!err.contains("hunter2-secret"), "{err}");
    assert!(err.contains("line 2"), "still says where: {err}");
    // A broker URL that does not parse names its key, not its password.
    let err = Settings::load_from(
        None,
        env(&[(
            "GEWE_WORKER__AMQP__URL",
            "amqp://worker:hunter2-secret@rabbit:port/%2f",
        )]),
    )
    .expect_err("bad port")
    .to_string();
    assert!(!err.contains("hunter2-secret"), "{err}");
    assert!(err.contains("amqp.url"), "{err}");
}

#[test]
fn a_token_too_short_to_mask_safely_is_refused() {
    let err = Settings::load_from(None, env(&[("GEWE_WORKER__GEWE__TOKEN", "2026")]))
        .expect_err("too short")
        .to_string();
    assert!(err.contains("gewe.token"), "{err}");
    assert!(!err.contains("2026"), "{err}");
    assert!(Settings::load_from(None, env(&[("GEWE_WORKER__GEWE__TOKEN", "20261127")])).is_ok());
}
