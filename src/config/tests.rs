//! Loading, layering, validation and redaction of the configuration.

use std::path::PathBuf;

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
    assert_eq!(c.early_grace, Duration::from_secs(120));
}

#[test]
fn callbacks_are_configured_from_the_environment() {
    let s = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__CALLBACKS__ENABLED", "true"),
            ("GEWE_WORKER__CALLBACKS__LISTEN", "0.0.0.0:8081"),
            ("GEWE_WORKER__CALLBACKS__SECRET", "cb-s3cret-0123456789"),
            ("GEWE_WORKER__CALLBACKS__MATCH_WINDOW", "7d"),
        ]),
    )
    .expect("valid");
    assert!(s.callbacks.enabled);
    assert_eq!(s.callbacks.listen.map(|l| l.port()), Some(8081));
    assert_eq!(s.callbacks.match_window, Duration::from_secs(7 * 24 * 3600));
    let printed = s.redacted_json();
    assert!(!printed.contains("cb-s3cret-0123456789"), "{printed}");
    assert!(printed.contains(r#""secret": "***""#), "{printed}");
    assert!(!format!("{s:?}").contains("cb-s3cret-0123456789"));
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
        (
            "GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT",
            "collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT",
            "http://collector:4318/?x=1",
            "telemetry.otlp_endpoint",
        ),
        (
            "GEWE_WORKER__TELEMETRY__SAMPLE_RATIO",
            "1.5",
            "telemetry.sample_ratio",
        ),
        (
            "GEWE_WORKER__TELEMETRY__SAMPLE_RATIO",
            "-0.1",
            "telemetry.sample_ratio",
        ),
        (
            "GEWE_WORKER__TELEMETRY__SERVICE_NAME",
            " ",
            "telemetry.service_name",
        ),
        ("GEWE_WORKER__CALLBACKS__QUEUE", "", "callbacks.queue"),
        (
            "GEWE_WORKER__CALLBACKS__MATCH_WINDOW",
            "0s",
            "callbacks.match_window",
        ),
        ("GEWE_WORKER__AMQP__MAX_HOLD", "5s", "amqp.max_hold"),
        ("GEWE_WORKER__AMQP__MAX_HOLD", "13h", "amqp.max_hold"),
        (
            "GEWE_WORKER__ACCOUNTS__DAILY_LIMIT",
            "-1",
            "accounts.daily_limit",
        ),
        (
            "GEWE_WORKER__ACCOUNTS__TIMEZONE",
            "Mars/Olympus",
            "accounts.timezone",
        ),
        (
            "GEWE_WORKER__ACCOUNTS__ACTIVE_HOURS",
            "8-22",
            "accounts.active_hours",
        ),
        (
            "GEWE_WORKER__ACCOUNTS__ACTIVE_HOURS",
            "09:00-09:00",
            "accounts.active_hours",
        ),
        ("GEWE_WORKER__ACCOUNTS__COOLDOWN", "0s", "accounts.cooldown"),
        (
            "GEWE_WORKER__ACCOUNTS__COOLDOWN",
            "100d",
            "accounts.cooldown",
        ),
        (
            "GEWE_WORKER__ACCOUNTS__COOLDOWN_ON",
            " , ",
            "accounts.cooldown_on",
        ),
        ("GEWE_WORKER__ACCOUNTS__MAX_WAIT", "0s", "accounts.max_wait"),
        ("GEWE_WORKER__DEDUPE__WINDOW", "0s", "dedupe.window"),
        ("GEWE_WORKER__DEDUPE__WINDOW", "59m", "dedupe.window"),
        (
            "GEWE_WORKER__CALLBACKS__EARLY_GRACE",
            "0s",
            "callbacks.early_grace",
        ),
        (
            "GEWE_WORKER__CALLBACKS__SECRET",
            "short-secret",
            "callbacks.secret",
        ),
        (
            "GEWE_WORKER__CALLBACKS__SECRET",
            "with+plus/and=0123456789",
            "callbacks.secret",
        ),
        (
            "GEWE_WORKER__CALLBACKS__SECRET",
            "with space 0123456789",
            "callbacks.secret",
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
fn a_callback_endpoint_beyond_loopback_requires_a_secret() {
    for listen in ["0.0.0.0:8081", "10.1.2.3:8081", "[::]:8081"] {
        let err = Settings::load_from(None, env(&[("GEWE_WORKER__CALLBACKS__LISTEN", listen)]))
            .expect_err(&format!("{listen} without a secret must be rejected"))
            .to_string();
        assert!(err.contains("callbacks.secret"), "{listen}: {err}");
    }
    for listen in ["127.0.0.1:8081", "[::1]:8081"] {
        Settings::load_from(None, env(&[("GEWE_WORKER__CALLBACKS__LISTEN", listen)]))
            .unwrap_or_else(|e| panic!("{listen} needs no secret: {e}"));
    }
    let s = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__CALLBACKS__LISTEN", "0.0.0.0:8081"),
            ("GEWE_WORKER__CALLBACKS__SECRET", "Az09._~-Az09._~-"),
        ]),
    )
    .expect("16 URL-safe characters are enough");
    assert!(s.callbacks.secret.is_some());
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
fn account_budgets_default_to_the_contract_and_take_overrides_from_toml() {
    let s = Settings::load_from(None, env(&[])).expect("defaults");
    let a = &s.accounts;
    assert_eq!(a.daily_limit, 0);
    assert_eq!(a.timezone, "Asia/Shanghai");
    assert!(a.active_hours.is_none());
    assert_eq!(a.cooldown, Duration::from_secs(6 * 3600));
    assert_eq!(a.cooldown_on, ["频繁"]);
    assert_eq!(a.max_wait, Duration::from_secs(7 * 86_400));
    assert!(a.overrides.is_empty());
    assert_eq!(s.amqp.max_hold, Duration::from_secs(600));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.toml");
    std::fs::write(
        &path,
        "[accounts]\ndaily_limit = 20\nactive_hours = \"22:00-06:00\"\ncooldown_on = [\"频繁\", \"too often\"]\n\
         [accounts.overrides.\"wx_a\"]\ndaily_limit = 40\nactive_hours = \"\"\nper_app_min_interval = \"1m\"\n",
    )
    .expect("write");
    let s = Settings::load_from(
        Some(&path),
        env(&[("GEWE_WORKER__ACCOUNTS__COOLDOWN", "12h")]),
    )
    .expect("valid");
    let a = &s.accounts;
    assert_eq!(
        (a.daily_limit, a.cooldown),
        (20, Duration::from_secs(12 * 3600))
    );
    assert_eq!(
        a.active_hours.map(|h| h.to_string()).as_deref(),
        Some("22:00-06:00")
    );
    assert_eq!(a.cooldown_on, ["频繁", "too often"]);
    let o = &a.overrides["wx_a"];
    assert_eq!(o.daily_limit, Some(40));
    assert_eq!(
        o.active_hours,
        Some(None),
        "an empty window opens it all day"
    );
    assert_eq!(o.per_app_min_interval, Some(Duration::from_secs(60)));
    std::fs::write(&path, "[accounts.overrides.\"wx_a\"]\ndaily_lmit = 40\n").expect("write");
    let err = Settings::load_from(Some(&path), env(&[]))
        .expect_err("a misspelt override key")
        .to_string();
    assert!(err.contains("daily_lmit"), "{err}");
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

#[test]
fn a_list_of_urls_is_printed_with_every_password_masked() {
    let s = Settings::load_from(
        None,
        env(&[(
            "GEWE_WORKER__AMQP__URL",
            "amqp://u:pw-one@h1:5672/%2f, amqp://u:pw-two@h2:5672/%2f,amqps://u:pw%2Cthree@h3/v",
        )]),
    )
    .expect("valid");
    let printed = s.redacted_json();
    assert!(
        printed.contains("amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f,amqps://u:***@h3/v"),
        "{printed}"
    );
    for secret in ["pw-one", "pw-two", "three"] {
        assert!(!printed.contains(secret), "{printed}");
    }
    let secrets = s.secrets();
    for secret in ["pw-one", "pw-two", "pw%2Cthree", "pw,three"] {
        assert!(secrets.iter().any(|s| s == secret), "{secret} missing");
    }
}

#[test]
fn an_invalid_url_in_a_list_is_named_without_its_password() {
    let err = Settings::load_from(
        None,
        env(&[(
            "GEWE_WORKER__AMQP__URL",
            "amqp://u:pw-one@h1/%2f,amqp:pw-two",
        )]),
    )
    .expect_err("not a URL")
    .to_string();
    assert!(
        err.contains("amqp.url") && err.contains("entry 2 of 2"),
        "{err}"
    );
    assert!(!err.contains("pw-one") && !err.contains("pw-two"), "{err}");
}

/// A CA, a certificate and a key as PEM files in `dir` (content is only
/// parsed, never verified, by validation).
fn pem_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (ca, crt, pem) = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );
    std::fs::write(&ca, cert.pem()).expect("write");
    std::fs::write(&crt, cert.pem()).expect("write");
    std::fs::write(&pem, key.serialize_pem()).expect("write");
    (ca, crt, pem)
}

#[test]
fn tls_files_are_checked_at_load_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = pem_files(dir.path());
    let missing = dir.path().join("missing.pem");
    let path = |p: &PathBuf| p.display().to_string();
    let ok = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__AMQP__TLS__CA_FILE", &path(&ca)),
            ("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", &path(&cert)),
            ("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", &path(&key)),
        ]),
    )
    .expect("valid TLS settings");
    assert_eq!(ok.amqp.tls.ca_file.as_ref(), Some(&ca));
    let key_text = std::fs::read_to_string(&key).expect("key");
    let body = key_text.lines().nth(1).expect("a base64 line");
    assert!(
        ok.secrets().iter().any(|s| s == body),
        "key lines are secrets"
    );
    let printed = ok.redacted_json();
    assert!(!printed.contains(body), "{printed}");

    for (pairs, named) in [
        (
            vec![("GEWE_WORKER__AMQP__TLS__CA_FILE", path(&missing))],
            "amqp.tls.ca_file",
        ),
        (
            vec![("GEWE_WORKER__AMQP__TLS__CA_FILE", path(&key))],
            "amqp.tls.ca_file",
        ),
        (
            vec![("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", path(&cert))],
            "amqp.tls.client_key_file",
        ),
        (
            vec![("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", path(&key))],
            "amqp.tls.client_cert_file",
        ),
        (
            vec![
                ("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", path(&cert)),
                ("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", path(&missing)),
            ],
            "amqp.tls.client_key_file",
        ),
        (
            vec![
                ("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", path(&key)),
                ("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", path(&key)),
            ],
            "amqp.tls.client_cert_file",
        ),
        (
            vec![
                ("GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE", path(&cert)),
                ("GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE", path(&cert)),
            ],
            "amqp.tls.client_key_file",
        ),
    ] {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = Settings::load_from(None, env(&pairs))
            .expect_err(&format!("{pairs:?} must be rejected"))
            .to_string();
        assert!(
            err.contains(named),
            "{pairs:?}: {err} does not name {named}"
        );
        assert!(!err.contains(body), "the key leaks: {err}");
    }
}

#[test]
fn the_redactor_of_the_settings_masks_every_secret_in_any_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, key) = pem_files(dir.path());
    let s = Settings::load_from(
        None,
        env(&[
            ("GEWE_WORKER__GEWE__TOKEN", "tok-1a2b"),
            (
                "GEWE_WORKER__AMQP__URL",
                "amqp://u:pw-one@h1/%2f,amqp://u:pw%21two@h2/%2f",
            ),
            ("GEWE_WORKER__REDIS__URL", "redis://:redis-pw@r:6379/0"),
            (
                "GEWE_WORKER__AMQP__TLS__CLIENT_CERT_FILE",
                &cert.display().to_string(),
            ),
            (
                "GEWE_WORKER__AMQP__TLS__CLIENT_KEY_FILE",
                &key.display().to_string(),
            ),
        ]),
    )
    .expect("valid");
    let key_text = std::fs::read_to_string(&key).expect("key");
    let redactor = crate::redact::Redactor::new(s.secrets()).expect("redactor");
    let text = format!(
        "tok-1a2b pw-one pw%21two pw!two redis-pw {key_text} {}",
        serde_json::json!({ "e": "pw!two" })
    );
    let masked = redactor.redact(&text);
    for secret in ["tok-1a2b", "pw-one", "two", "redis-pw"] {
        assert!(!masked.contains(secret), "{secret} in {masked}");
    }
    for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!masked.contains(line), "key line in {masked}");
    }
}

#[test]
fn tls_settings_without_an_amqps_url_are_flagged_as_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, _, _) = pem_files(dir.path());
    let ca = ca.display().to_string();
    let load = |url: &str| {
        Settings::load_from(
            None,
            env(&[
                ("GEWE_WORKER__AMQP__URL", url),
                ("GEWE_WORKER__AMQP__TLS__CA_FILE", &ca),
            ]),
        )
        .expect("valid")
    };
    assert!(
        load("amqp://u:p@h1/%2f,amqp://u:p@h2/%2f")
            .amqp
            .tls_unused()
    );
    assert!(
        !load("amqp://u:p@h1/%2f,amqps://u:p@h2/%2f")
            .amqp
            .tls_unused()
    );
    assert!(
        !Settings::load_from(None, env(&[]))
            .expect("defaults")
            .amqp
            .tls_unused()
    );
}

#[test]
fn trace_export_is_off_by_default_and_checked_when_set() {
    let s = Settings::load_from(None, env(&[])).expect("defaults are valid");
    assert!(s.telemetry.otlp_endpoint.is_none());
    assert_eq!(s.telemetry.sample_ratio, 1.0);
    assert_eq!(s.telemetry.service_name, "gewe-friend-worker");
    let s = Settings::load_from(
        None,
        env(&[
            (
                "GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT",
                "https://user:otlp-pa55word@collector:4318",
            ),
            ("GEWE_WORKER__TELEMETRY__SAMPLE_RATIO", "0.25"),
            ("GEWE_WORKER__TELEMETRY__SERVICE_NAME", "friends-eu"),
        ]),
    )
    .expect("valid");
    assert_eq!(s.telemetry.sample_ratio, 0.25);
    assert_eq!(s.telemetry.service_name, "friends-eu");
    let printed = s.redacted_json();
    assert!(!printed.contains("otlp-pa55word"), "{printed}");
    assert!(s.secrets().contains(&"otlp-pa55word".to_owned()));
    let off = env(&[("GEWE_WORKER__TELEMETRY__OTLP_ENDPOINT", "")]);
    let s = Settings::load_from(None, off).expect("empty is off");
    assert!(s.telemetry.otlp_endpoint.is_none());
}
