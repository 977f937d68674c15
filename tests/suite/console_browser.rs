//! The console in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`) over WebDriver signs in, sees the accounts
//! table, pauses and resumes an account, and replays a dead letter whose
//! event then arrives. It also takes the README's screenshot
//! (`GEWE_UPDATE_SCREENSHOT=1` writes `docs/console.png`; otherwise it goes
//! to `target/console.png`).

use std::{path::PathBuf, time::SystemTime};

use crate::common::{admin::*, webdriver::Browser, *};
use lapin::{
    BasicProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldArray, FieldTable},
};

/// A dead letter as the broker leaves one that passed the delivery limit.
fn dead_by_delivery_limit(queue: &str) -> BasicProperties {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert(
        "reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    death.insert("queue".into(), AMQPValue::LongString(queue.into()));
    death.insert("exchange".into(), AMQPValue::LongString("".into()));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    death.insert("time".into(), AMQPValue::Timestamp(now));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    BasicProperties::default().with_headers(headers)
}

/// The state the worker's own budget keeper shows for `app_id`.
async fn state_of(api: &Api, app_id: &str) -> String {
    let (_, accounts) = api.get("/api/accounts").await;
    accounts
        .as_array()
        .and_then(|all| all.iter().find(|a| a["appId"] == app_id))
        .and_then(|a| a["state"].as_str())
        .unwrap_or("absent")
        .to_owned()
}

#[tokio::test]
async fn an_operator_signs_in_pauses_and_resumes_an_account_and_replays_a_dead_letter() {
    // GeWe is the simulator playing WeChat's daily limit: one success per
    // account and day, then "too often".
    let stop_sim = tokio_util::sync::CancellationToken::new();
    let (gewe, _sim) = gewe_friend_worker::simulator::spawn(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        gewe_friend_worker::simulator::Options {
            daily_limit: Some(1),
            ..Default::default()
        },
        stop_sim.clone(),
    )
    .await
    .expect("simulator");
    let mut settings = test_settings(&format!("http://{gewe}"));
    with_admin(&mut settings);
    // The worker's own budget keeper behind the console.
    let mut app = spawn_app(settings).await;
    let admin = app.admin_addr.expect("bound");
    let api = Api::new(admin);
    let (resting, steady) = (unique("wx_sales"), unique("wx_support"));
    app.publish(&command(&unique("first"), &resting)).await;
    app.publish(&command(&unique("steady"), &steady)).await;
    for e in app.events(2).await {
        assert_eq!(e.status(), "succeeded", "{}", e.body);
    }
    // The account's second request meets the simulator's limit: it rests.
    app.publish(&command(&unique("second"), &resting)).await;
    eventually(WAIT, || async {
        let state = state_of(&api, &resting).await;
        done_or(state == "cooling_down", || format!("{resting} is {state}"))
    })
    .await;
    // Dead letters: one malformed (dead-lettered by the worker itself) and
    // one command that had passed the delivery limit.
    app.publish(&serde_json::json!({"commandId": "no-app-id", "chatroomId": "1@chatroom", "memberWxid": "wxid_x", "content": "hi"}))
        .await;
    assert_eq!(app.next_event().await.kind(), Some("invalid_command"));
    let replay_id = unique("browser-replay");
    // An account with its day's request still to send (the simulator
    // allows one).
    let replayable = command(&replay_id, &unique("wx_replay"));
    app.channel
        .basic_publish(
            app.settings.amqp.dead_letter_exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            replayable.to_string().as_bytes(),
            dead_by_delivery_limit(&app.settings.amqp.command_queue),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");

    let browser = Browser::start(1280, 1500).await;
    browser.go(&format!("http://{admin}/")).await;
    let token = browser.wait_for("#token", "").await;
    browser.type_into(&token, ADMIN_TOKEN).await;
    let sign_in = browser.wait_for("#sign-in", "Sign in").await;
    browser.click(&sign_in).await;
    browser.wait_for("#accounts", &resting).await;
    browser
        .wait_for(
            &format!(r#"tr[data-app="{resting}"] td.state"#),
            "cooling down",
        )
        .await;
    browser.wait_for("#accounts", "频繁").await;
    browser.wait_for("#dead-letters", &replay_id).await;
    browser.wait_for("#dead-letters", "delivery_limit").await;

    // Pause the other account with a duration and a reason, then resume.
    let pause_for = browser.wait_for("#pause-for", "").await;
    browser.type_into(&pause_for, "2h").await;
    let reason = browser.wait_for("#pause-reason", "").await;
    browser.type_into(&reason, "WeChat warned").await;
    let pause = browser
        .wait_for(
            &format!(r#"button[data-action="pause"][data-app="{steady}"]"#),
            "Pause",
        )
        .await;
    browser.click(&pause).await;
    browser
        .wait_for(&format!(r#"tr[data-app="{steady}"] td.state"#), "paused")
        .await;
    assert_eq!(state_of(&api, &steady).await, "paused");
    browser
        .wait_for("#status", &format!("paused {steady}"))
        .await;

    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    let to = if std::env::var_os("GEWE_UPDATE_SCREENSHOT").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console.png")
    };
    std::fs::write(&to, &shot).expect("screenshot written");
    // The same page on a phone's width.
    browser.resize(390, 844).await;
    let phone = browser.screenshot().await;
    std::fs::write(to.with_file_name("console-phone.png"), &phone).expect("written");
    browser.resize(1280, 1500).await;

    let resume = browser
        .wait_for(
            &format!(r#"button[data-action="resume"][data-app="{steady}"]"#),
            "Resume",
        )
        .await;
    browser.click(&resume).await;
    browser
        .wait_for(&format!(r#"tr[data-app="{steady}"] td.state"#), "active")
        .await;
    assert_eq!(state_of(&api, &steady).await, "active");

    // Replay the dead letter; its event arrives.
    let list = api.dead_letters(10).await;
    let id = list
        .iter()
        .find(|d| d["commandId"] == replay_id.as_str())
        .and_then(|d| d["id"].as_str())
        .expect("listed")
        .to_owned();
    let button = browser
        .wait_for(
            &format!(r#"button[data-action="replay"][data-id="{id}"]"#),
            "Replay",
        )
        .await;
    browser.click(&button).await;
    let event = app.next_event().await;
    assert_eq!(event.body["commandId"], replay_id.as_str());
    assert_eq!(event.status(), "succeeded");
    browser
        .wait_for("#status", &format!("replayed {replay_id}"))
        .await;
    browser.quit().await;
    stop_sim.cancel();
    app.stop().await;
}
