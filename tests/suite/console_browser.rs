//! The console in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`) over WebDriver signs in, sees the accounts
//! table, pauses and resumes an account, and replays a dead letter whose
//! event then arrives. It also takes the README's screenshot
//! (`GEWE_UPDATE_SCREENSHOT=1` writes `docs/console.png`; otherwise it goes
//! to `target/console.png`).

use std::{path::PathBuf, time::SystemTime};

use crate::common::{admin::*, webdriver::Browser, *};
use gewe_friend_worker::{
    accounts::{AccountState, AccountView},
    gewe::ADD_MEMBER_PATH,
};
use lapin::{
    BasicProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldArray, FieldTable},
};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

fn account(app_id: &str, state: AccountState, sent: u32, reason: Option<&str>) -> AccountView {
    let resting = matches!(
        state,
        AccountState::CoolingDown | AccountState::OverLimit | AccountState::OutsideHours
    );
    AccountView {
        app_id: app_id.to_owned(),
        state,
        sent_today: sent,
        daily_limit: Some(40),
        resting_until: resting.then(|| "2026-12-03T22:00:00.000Z".to_owned()),
        reason: reason.map(str::to_owned),
        last_sent_at: Some("2026-12-03T13:52:10.412Z".to_owned()),
        last_outcome: Some(
            if state == AccountState::CoolingDown {
                "rejected"
            } else {
                "succeeded"
            }
            .to_owned(),
        ),
    }
}

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

#[tokio::test]
async fn an_operator_signs_in_pauses_and_resumes_an_account_and_replays_a_dead_letter() {
    let gewe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ADD_MEMBER_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(gewe_ok("v3_browser")))
        .mount(&gewe)
        .await;
    let mut settings = test_settings(&gewe.uri());
    with_admin(&mut settings);
    let accounts = MemoryDirectory::of(&[]);
    *accounts.accounts.lock().expect("lock") = vec![
        account("wx_sales_01", AccountState::Active, 12, None),
        account(
            "wx_sales_02",
            AccountState::CoolingDown,
            31,
            Some("操作过于频繁，请稍后再试"),
        ),
        account("wx_support", AccountState::OverLimit, 40, None),
        account("wx_night_shift", AccountState::OutsideHours, 0, None),
    ];
    let mut app = spawn_app_with_accounts(settings, true, Some(accounts.clone())).await;
    let admin = app.admin_addr.expect("bound");
    // Dead letters: one malformed (dead-lettered by the worker itself) and
    // one command that had passed the delivery limit.
    app.publish(&serde_json::json!({"commandId": "no-app-id", "chatroomId": "1@chatroom", "memberWxid": "wxid_x", "content": "hi"}))
        .await;
    assert_eq!(app.next_event().await.kind(), Some("invalid_command"));
    let replayable = command("browser-replay-1", "wx_sales_01");
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
    browser.wait_for("#accounts", "wx_sales_02").await;
    browser.wait_for("#accounts", "cooling down").await;
    browser.wait_for("#dead-letters", "browser-replay-1").await;
    browser.wait_for("#dead-letters", "delivery_limit").await;

    // Pause with a duration and a reason, then resume.
    let pause_for = browser.wait_for("#pause-for", "").await;
    browser.type_into(&pause_for, "2h").await;
    let reason = browser.wait_for("#pause-reason", "").await;
    browser.type_into(&reason, "WeChat warned").await;
    let pause = browser
        .wait_for(
            r#"button[data-action="pause"][data-app="wx_sales_01"]"#,
            "Pause",
        )
        .await;
    browser.click(&pause).await;
    browser
        .wait_for(r#"tr[data-app="wx_sales_01"] td.state"#, "paused")
        .await;
    assert_eq!(accounts.state("wx_sales_01"), Some(AccountState::Paused));
    browser.wait_for("#status", "paused wx_sales_01").await;

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
            r#"button[data-action="resume"][data-app="wx_sales_01"]"#,
            "Resume",
        )
        .await;
    browser.click(&resume).await;
    browser
        .wait_for(r#"tr[data-app="wx_sales_01"] td.state"#, "active")
        .await;
    assert_eq!(accounts.state("wx_sales_01"), Some(AccountState::Active));

    // Replay the dead letter; its event arrives.
    let list = Api::new(admin).dead_letters(10).await;
    let id = list
        .iter()
        .find(|d| d["commandId"] == "browser-replay-1")
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
    assert_eq!(event.body["commandId"], "browser-replay-1");
    assert_eq!(event.status(), "succeeded");
    browser
        .wait_for("#status", "replayed browser-replay-1")
        .await;
    browser.quit().await;
    app.stop().await;
}
