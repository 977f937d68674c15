//! Account budgets (contract §7) on the real broker: commands over a daily
//! limit, outside active hours, for a cooling-down account or with a far
//! pacing turn are deferred through the deferral ladder, not sent and not
//! held; they come back counted, or expire.

use std::time::Duration;

use crate::common::{delay_queues::*, fake_gewe::FakeGewe, *};
use gewe_friend_worker::config::Settings;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};

/// WeChat's "too often" for members whose wxid says so; success otherwise.
fn too_often_for_some(member: &str, nth: usize) -> (axum::http::StatusCode, Value) {
    if member.contains("often") {
        (
            axum::http::StatusCode::OK,
            json!({"ret": 500, "msg": "添加好友失败", "data": {"code": "-1", "msg": "操作过于频繁，请稍后再试"}}),
        )
    } else {
        fake_gewe::success(member, nth)
    }
}

/// A fixed-offset zone where it is about noon now, so no test day ends
/// while a test runs.
fn noon_zone() -> String {
    let utc_hour = i32::from(
        jiff::Zoned::now()
            .with_time_zone(jiff::tz::TimeZone::UTC)
            .hour(),
    );
    let offset = 12 - utc_hour;
    // Etc/GMT names are sign-inverted: Etc/GMT-8 is UTC+8.
    match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

fn budgeted(gewe: &FakeGewe, daily_limit: u32) -> Settings {
    let mut s = test_settings(&gewe.url);
    s.accounts.daily_limit = daily_limit;
    s.accounts.timezone = noon_zone();
    s
}

#[tokio::test]
async fn over_its_daily_limit_an_account_defers_the_rest_and_sends_nothing_more() {
    alone(async {
        let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
        let mut app = spawn_app(budgeted(&gewe, 2)).await;
        let before = metric(app.ops_addr, "commands_deferred_total", "daily_limit").await;
        let account = unique("wx-limit");
        for i in 0..4 {
            app.publish(&command(&format!("{account}-{i}"), &account))
                .await;
        }
        for e in app.events(2).await {
            assert_eq!(e.status(), "succeeded", "{}", e.body);
        }
        wait_for_metric(
            app.ops_addr,
            "commands_deferred_total",
            "daily_limit",
            before + 2.0,
            "two commands deferred for the daily limit",
        )
        .await;
        assert!(
            app.try_next_event(Duration::from_millis(300))
                .await
                .is_none(),
            "no event for a deferred command"
        );
        assert_eq!(
            gewe.arrivals(&account).len(),
            2,
            "only the limit reached GeWe"
        );
        let copies = deferred_copies(&app.connection, &app.settings).await;
        assert_eq!(copies.len(), 2, "{copies:?}");
        for copy in &copies {
            assert_eq!(copy.count("x-gewe-deferred"), Some(1));
            assert_eq!(copy.count("x-gewe-attempts"), Some(0));
            assert!(
                copy.text("x-gewe-first-received")
                    .is_some_and(|t| t.ends_with('Z'))
            );
            assert_eq!(
                copy.body["appId"],
                account.as_str(),
                "the body is unchanged"
            );
        }
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_turn_further_than_max_hold_is_deferred_and_its_event_counts_the_deferrals() {
    alone(async {
        let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
        let mut settings = test_settings(&gewe.url);
        settings.pacing.per_app_min_interval = Duration::from_secs(12);
        settings.amqp.max_hold = Duration::from_secs(10);
        let mut app = spawn_app(settings.clone()).await;
        wait_for_readyz(app.ops_addr, 200, "ready").await;
        shorten_ladder(&app.channel, &settings, Duration::from_secs(1)).await;
        let before = metric(app.ops_addr, "commands_deferred_total", "pacing").await;
        let account = unique("wx-paced");
        for i in 0..2 {
            app.publish(&command(&format!("{account}-{i}"), &account))
                .await;
        }
        let first = app.next_event().await;
        assert_eq!(first.status(), "succeeded");
        assert!(first.body.get("deferred").is_none(), "{}", first.body);
        let second = tokio::time::timeout(Duration::from_secs(30), app.next_event())
            .await
            .expect("the second command is carried out after its turn");
        assert_eq!(second.status(), "succeeded", "{}", second.body);
        assert!(
            second.body["deferred"].as_u64().unwrap_or(0) >= 1,
            "{}",
            second.body
        );
        assert_eq!(second.attempts(), 1);
        assert!(metric(app.ops_addr, "commands_deferred_total", "pacing").await > before);
        gewe.assert_paced(&account, 2, Duration::from_secs(12));
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_command_that_waits_past_max_wait_expires_unsent_and_its_copy_gets_the_same_answer() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = budgeted(&gewe, 1);
    settings.accounts.max_wait = Duration::from_secs(3);
    let mut app = spawn_app(settings.clone()).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    shorten_ladder(&app.channel, &settings, Duration::from_millis(500)).await;
    let account = unique("wx-expire");
    let (a, b) = (format!("{account}-a"), format!("{account}-b"));
    app.publish(&command(&a, &account)).await;
    assert_eq!(app.next_event().await.status(), "succeeded");
    app.publish(&command(&b, &account)).await;
    let expired = app.next_event().await;
    assert_eq!(expired.body["commandId"], b.as_str());
    assert_eq!(expired.kind(), Some("expired"), "{}", expired.body);
    assert_eq!(expired.body["error"]["retryable"], false);
    assert_eq!(expired.attempts(), 0);
    assert!(
        expired.body["deferred"].as_u64().unwrap_or(0) >= 2,
        "{}",
        expired.body
    );
    assert_eq!(
        gewe.arrivals(&account).len(),
        1,
        "the expired command was never sent"
    );
    app.publish(&command(&b, &account)).await;
    let copy = app.next_event().await;
    assert_eq!(
        (copy.kind(), copy.body["duplicate"].as_bool()),
        (Some("expired"), Some(true))
    );
    app.stop().await;
}

#[tokio::test]
async fn the_worker_s_headers_from_a_publisher_are_ignored() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    settings.accounts.max_wait = Duration::from_secs(60);
    let mut app = spawn_app(settings).await;
    let mut forged = FieldTable::default();
    forged.insert("x-gewe-parked".into(), AMQPValue::LongLongInt(5));
    forged.insert("x-gewe-deferred".into(), AMQPValue::LongLongInt(3));
    forged.insert("x-gewe-attempts".into(), AMQPValue::LongLongInt(7));
    forged.insert(
        "x-gewe-first-received".into(),
        AMQPValue::LongString("2000-01-01T00:00:00Z".into()),
    );
    let id = unique("forged");
    app.publish_raw(
        command(&id, "wx-forged").to_string().as_bytes(),
        BasicProperties::default().with_headers(forged),
    )
    .await;
    let e = app.next_event().await;
    assert_eq!(
        e.status(),
        "succeeded",
        "not expired by a forged first-received: {}",
        e.body
    );
    assert_eq!(e.attempts(), 1, "forged attempts are not added");
    assert!(
        e.body.get("parked").is_none() && e.body.get("deferred").is_none(),
        "{}",
        e.body
    );
    app.stop().await;
}

#[tokio::test]
async fn too_often_rests_the_account_and_its_later_commands_wait_without_a_call() {
    alone(async {
        let gewe = FakeGewe::start(Duration::ZERO, too_often_for_some).await;
        let mut settings = test_settings(&gewe.url);
        settings.accounts.cooldown = Duration::from_secs(3600);
        let mut app = spawn_app(settings.clone()).await;
        let cooldowns = metric(app.ops_addr, "account_cooldowns_total", "").await;
        let deferred = metric(app.ops_addr, "commands_deferred_total", "cooldown").await;
        let (resting, other) = (unique("wx-rest"), unique("wx-other"));
        app.publish(&command(&unique("often"), &resting)).await;
        wait_for_metric(
            app.ops_addr,
            "account_cooldowns_total",
            "",
            cooldowns + 1.0,
            "a cooldown starts",
        )
        .await;
        app.publish(&command(&unique("later"), &resting)).await;
        app.publish(&command(&unique("fine"), &other)).await;
        let e = app.next_event().await;
        assert_eq!(
            (e.status(), e.body["appId"].as_str()),
            ("succeeded", Some(other.as_str()))
        );
        wait_for_metric(
            app.ops_addr,
            "commands_deferred_total",
            "cooldown",
            deferred + 2.0,
            "the command that met it and the later one are deferred",
        )
        .await;
        assert_eq!(
            gewe.arrivals(&resting).len(),
            1,
            "no call while the account rests"
        );
        assert!(
            app.try_next_event(Duration::from_millis(300))
                .await
                .is_none(),
            "no failed event"
        );
        let copies = deferred_copies(&app.connection, &settings).await;
        assert_eq!(copies.len(), 2);
        assert!(
            copies.iter().all(|c| c.count("x-gewe-attempts") == Some(0)),
            "meeting 'too often' does not use an attempt"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn outside_active_hours_nothing_is_sent_and_commands_wait_in_the_hour_queue() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut settings = test_settings(&gewe.url);
    // A window that opens two hours from now, in the accounts' zone.
    settings.accounts.timezone = noon_zone();
    let now = jiff::Zoned::now()
        .with_time_zone(jiff::tz::TimeZone::get(&settings.accounts.timezone).expect("a zone"));
    let minute = (i32::from(now.hour()) * 60 + i32::from(now.minute()) + 120) % 1440;
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        minute / 60,
        minute % 60,
        ((minute + 60) % 1440) / 60,
        minute % 60
    );
    settings.accounts.active_hours = Some(window.parse().expect("a window"));
    let mut app = spawn_app(settings.clone()).await;
    let account = unique("wx-hours");
    for i in 0..2 {
        app.publish(&command(&format!("{account}-{i}"), &account))
            .await;
    }
    let copies = eventually(WAIT, || async {
        let copies = peek(
            &app.connection,
            &format!("{}.defer.1h", settings.amqp.command_queue),
        )
        .await;
        if copies.len() == 2 {
            Ok(copies)
        } else {
            Err(format!("{} copies in the 1h queue", copies.len()))
        }
    })
    .await;
    assert!(copies.iter().all(|c| c.count("x-gewe-deferred") == Some(1)));
    assert!(
        gewe.arrivals(&account).is_empty(),
        "window {window}: nothing sent"
    );
    assert!(
        app.try_next_event(Duration::from_millis(200))
            .await
            .is_none()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_of_a_finished_command_is_answered_at_once_whatever_the_budget() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let mut app = spawn_app(budgeted(&gewe, 1)).await;
    let account = unique("wx-dup");
    let id = format!("{account}-1");
    app.publish(&command(&id, &account)).await;
    assert_eq!(app.next_event().await.status(), "succeeded");
    app.publish(&command(&id, &account)).await;
    let copy = app.next_event().await;
    assert_eq!(
        (copy.status(), copy.body["duplicate"].as_bool()),
        ("succeeded", Some(true))
    );
    assert_eq!(gewe.arrivals(&account).len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_deferral_queue_is_declared_again_and_the_copy_lands_in_it() {
    let gewe = FakeGewe::start(Duration::ZERO, fake_gewe::success).await;
    let settings = budgeted(&gewe, 1);
    let mut app = spawn_app(settings.clone()).await;
    wait_for_readyz(app.ops_addr, 200, "ready").await;
    for delay in gewe_friend_worker::defer::DEFER_DELAYS {
        let queue =
            gewe_friend_worker::config::defer_queue_name(&settings.amqp.command_queue, delay);
        app.channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .expect("an operator deletes the deferral queue");
    }
    // Under load: 200 commands at once, all but one deferred, the first
    // of them finding the queue missing.
    let account = unique("wx-redeclare");
    for i in 0..200 {
        app.publish(&command(&format!("{account}-{i}"), &account))
            .await;
    }
    assert_eq!(app.next_event().await.status(), "succeeded");
    let copies = eventually(WAIT, || async {
        let copies = deferred_copies(&app.connection, &settings).await;
        if copies.len() == 199 {
            Ok(copies)
        } else {
            Err(format!("{} of 199 copies", copies.len()))
        }
    })
    .await;
    assert!(copies.iter().all(|c| c.count("x-gewe-deferred") == Some(1)));
    assert_eq!(
        gewe.arrivals(&account).len(),
        1,
        "no deferred command was sent"
    );
    assert!(
        app.try_next_event(Duration::from_millis(200))
            .await
            .is_none()
    );
    app.stop().await;
}

/// Deletes what the budget of `apps` left in Redis.
async fn forget_accounts(apps: &[&str]) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for app in apps {
        let _: () = redis::cmd("DEL")
            .arg(format!("gewe-friend-worker:acct:{app}"))
            .query_async(&mut conn)
            .await
            .expect("del");
        let _: () = redis::cmd("ZREM")
            .arg("gewe-friend-worker:accounts")
            .arg(*app)
            .query_async(&mut conn)
            .await
            .expect("zrem");
    }
}

#[tokio::test]
async fn two_replicas_with_redis_keep_one_daily_limit_one_cooldown_and_counts_across_a_restart() {
    let gewe = FakeGewe::start(Duration::from_millis(5), too_often_for_some).await;
    let mut settings = budgeted(&gewe, 20);
    settings.redis.url = Some(redis_url());
    settings.amqp.prefetch = 64;
    settings.accounts.cooldown = Duration::from_secs(3600);
    let mut app = spawn_app(settings.clone()).await;
    let (stop_b, worker_b, _) = start_worker(&settings).await;
    let (limited, cooling) = (unique("wx-shared"), unique("wx-shared-cool"));
    for i in 0..60 {
        app.publish(&command(&format!("{limited}-{i}"), &limited))
            .await;
    }
    for e in app.events(20).await {
        assert_eq!(e.status(), "succeeded", "{}", e.body);
    }
    eventually(WAIT, || async {
        let n = deferred_copies(&app.connection, &settings).await.len();
        done_or(n == 40, || format!("{n} of 40 deferred"))
    })
    .await;
    assert_eq!(
        gewe.arrivals(&limited).len(),
        20,
        "exactly the limit reached GeWe, over two replicas"
    );
    // A cooldown met on one replica holds on both.
    app.publish(&command(&unique("often"), &cooling)).await;
    eventually(WAIT, || async {
        let n = deferred_copies(&app.connection, &settings).await.len();
        done_or(n == 41, || format!("{n} deferred"))
    })
    .await;
    for i in 0..10 {
        app.publish(&command(&format!("{cooling}-{i}"), &cooling))
            .await;
    }
    eventually(WAIT, || async {
        let n = deferred_copies(&app.connection, &settings).await.len();
        done_or(n == 51, || format!("{n} deferred"))
    })
    .await;
    assert_eq!(
        gewe.arrivals(&cooling).len(),
        1,
        "no replica called the resting account"
    );
    // The count survives a restart of every replica.
    stop_b.cancel();
    worker_b.await.expect("join").expect("clean exit");
    app.stop_worker().await;
    let (stop_c, worker_c, _) = start_worker(&settings).await;
    app.publish(&command(&format!("{limited}-after"), &limited))
        .await;
    eventually(WAIT, || async {
        let n = deferred_copies(&app.connection, &settings).await.len();
        done_or(n == 52, || format!("{n} deferred"))
    })
    .await;
    assert_eq!(gewe.arrivals(&limited).len(), 20);
    stop_c.cancel();
    worker_c.await.expect("join").expect("clean exit");
    forget_accounts(&[&limited, &cooling]).await;
    app.stop().await;
}

#[tokio::test]
async fn the_simulator_s_daily_limit_makes_the_worker_rest_the_account() {
    let stop = tokio_util::sync::CancellationToken::new();
    let (gewe_addr, _sim) = gewe_friend_worker::simulator::spawn(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        gewe_friend_worker::simulator::Options {
            daily_limit: Some(1),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .expect("simulator");
    let settings = test_settings(&format!("http://{gewe_addr}"));
    let mut app = spawn_app(settings.clone()).await;
    let account = unique("wx-sim");
    app.publish(&command(&format!("{account}-1"), &account))
        .await;
    assert_eq!(app.next_event().await.status(), "succeeded");
    // WeChat (the simulator) now says "too often": the command rests with
    // its account instead of failing.
    app.publish(&command(&format!("{account}-2"), &account))
        .await;
    let copies = eventually(WAIT, || async {
        let copies = deferred_copies(&app.connection, &settings).await;
        if copies.len() == 1 {
            Ok(copies)
        } else {
            Err(format!("{} copies", copies.len()))
        }
    })
    .await;
    assert_eq!(copies[0].body["commandId"], format!("{account}-2"));
    assert!(
        app.try_next_event(Duration::from_millis(200))
            .await
            .is_none(),
        "no failed event"
    );
    stop.cancel();
    app.stop().await;
}
