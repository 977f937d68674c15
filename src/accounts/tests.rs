//! The budgets on a clock the tests turn: day boundaries, windows that wrap
//! midnight, cooldowns, pauses and units given back.

use std::sync::atomic::{AtomicU64, Ordering};

use jiff::{Timestamp, tz::TimeZone};

use super::*;
use crate::config::{AccountOverride, AccountsSettings, PacingSettings};

struct FakeClock(AtomicU64);

impl Clock for FakeClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

fn at(text: &str) -> Millis {
    u64::try_from(text.parse::<Timestamp>().expect("a time").as_millisecond()).expect("after 1970")
}

fn settings(limit: u32, hours: &str) -> AccountsSettings {
    AccountsSettings {
        daily_limit: limit,
        timezone: "Asia/Shanghai".into(),
        active_hours: (!hours.is_empty()).then(|| hours.parse().expect("a window")),
        cooldown: Duration::from_secs(6 * 3600),
        cooldown_on: vec!["频繁".into()],
        max_wait: Duration::from_secs(7 * 86_400),
        overrides: Default::default(),
    }
}

fn keeper(s: AccountsSettings, interval_ms: u64, start: &str) -> (Accounts, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock(AtomicU64::new(at(start))));
    let pacing = PacingSettings {
        per_app_concurrency: 1,
        per_app_min_interval: Duration::from_millis(interval_ms),
    };
    let accounts = Accounts::new(
        Policies::new(&s, &pacing),
        Calendar::new(TimeZone::get("Asia/Shanghai").expect("bundled")),
        clock.clone(),
        Ledger::Memory(ledger::MemoryLedger::new()),
    );
    (accounts, clock)
}

const HOLD: Duration = Duration::from_secs(600);

async fn admit(a: &Accounts, app: &str) -> Result<Admitted, Rest> {
    a.admit(app, HOLD, &Halt::never())
        .await
        .expect("never halted")
}

#[tokio::test]
async fn the_daily_limit_holds_until_local_midnight_and_units_come_back() {
    // 23:00 in Shanghai.
    let (a, clock) = keeper(settings(2, ""), 0, "2026-12-03T15:00:00Z");
    let first = admit(&a, "wx").await.expect("first");
    admit(&a, "wx").await.expect("second");
    assert_eq!(
        admit(&a, "wx").await.err(),
        Some(Rest::DailyLimit(at("2026-12-03T16:00:00Z")))
    );
    assert!(
        admit(&a, "other").await.is_ok(),
        "other accounts are not affected"
    );
    // WeChat never saw the first: its unit comes back.
    a.give_back(first.unit).await;
    admit(&a, "wx").await.expect("the unit given back");
    assert!(admit(&a, "wx").await.is_err());
    // Midnight in Shanghai: a new day.
    clock.0.store(at("2026-12-03T16:00:00Z"), Ordering::SeqCst);
    admit(&a, "wx").await.expect("a new day");
    let views = a.views().await.expect("views");
    let wx = views.iter().find(|v| v.app_id == "wx").expect("listed");
    assert_eq!(
        (wx.sent_today, wx.daily_limit, wx.state),
        (1, Some(2), AccountState::Active)
    );
}

#[tokio::test]
async fn a_unit_given_back_after_midnight_does_not_touch_the_new_day() {
    let (a, clock) = keeper(settings(1, ""), 0, "2026-12-03T15:59:00Z");
    let old = admit(&a, "wx").await.expect("admitted");
    clock.0.store(at("2026-12-03T16:01:00Z"), Ordering::SeqCst);
    admit(&a, "wx").await.expect("new day");
    a.give_back(old.unit).await;
    assert!(
        admit(&a, "wx").await.is_err(),
        "yesterday's unit is not today's"
    );
}

#[tokio::test]
async fn active_hours_that_wrap_midnight() {
    // 22:00-06:00 local; 12:00 local is closed until 22:00.
    let (a, clock) = keeper(settings(0, "22:00-06:00"), 0, "2026-12-03T04:00:00Z");
    assert_eq!(
        admit(&a, "wx").await.err(),
        Some(Rest::ActiveHours(at("2026-12-03T14:00:00Z")))
    );
    clock.0.store(at("2026-12-03T17:30:00Z"), Ordering::SeqCst); // 01:30 local
    admit(&a, "wx").await.expect("open after midnight");
    clock.0.store(at("2026-12-03T22:00:00Z"), Ordering::SeqCst); // 06:00 local
    assert_eq!(
        admit(&a, "wx").await.err(),
        Some(Rest::ActiveHours(at("2026-12-04T14:00:00Z")))
    );
}

#[tokio::test]
async fn a_cooldown_rests_the_account_and_ends() {
    let (a, clock) = keeper(settings(0, ""), 0, "2026-12-03T04:00:00Z");
    let until = a.cool_down("wx", "操作过于频繁").await;
    assert_eq!(until, at("2026-12-03T10:00:00Z"));
    assert_eq!(admit(&a, "wx").await.err(), Some(Rest::Cooldown(until)));
    assert_eq!(
        a.rests_now("wx", &Halt::never()).await.expect("asked"),
        Some(Rest::Cooldown(until))
    );
    let view = a.views().await.expect("views").remove(0);
    assert_eq!(view.state, AccountState::CoolingDown);
    assert_eq!(view.reason.as_deref(), Some("操作过于频繁"));
    clock.0.store(until, Ordering::SeqCst);
    admit(&a, "wx").await.expect("rested");
}

#[tokio::test]
async fn a_pause_holds_until_resumed_or_its_end() {
    let (a, clock) = keeper(settings(0, ""), 0, "2026-12-03T04:00:00Z");
    AccountDirectory::pause(&a, "wx", None, Some("WeChat warned us"))
        .await
        .expect("paused");
    assert_eq!(admit(&a, "wx").await.err(), Some(Rest::Paused(None)));
    AccountDirectory::resume(&a, "wx").await.expect("resumed");
    admit(&a, "wx").await.expect("resumed");
    AccountDirectory::pause(&a, "wx", Some(Duration::from_secs(60)), None)
        .await
        .expect("paused");
    let until = at("2026-12-03T04:01:00Z");
    assert_eq!(admit(&a, "wx").await.err(), Some(Rest::Paused(Some(until))));
    clock.0.store(until, Ordering::SeqCst);
    admit(&a, "wx").await.expect("the pause ended");
}

#[tokio::test]
async fn a_turn_further_than_the_hold_is_not_reserved() {
    let (a, clock) = keeper(settings(0, ""), 60_000, "2026-12-03T04:00:00Z");
    assert_eq!(admit(&a, "wx").await.expect("first").wait, Duration::ZERO);
    let second = a
        .admit("wx", Duration::from_secs(30), &Halt::never())
        .await
        .expect("not halted");
    assert_eq!(
        second.err(),
        Some(Rest::Pacing(at("2026-12-03T04:01:00Z"))),
        "60 s away with 30 s of hold left"
    );
    // Nothing was reserved: a long hold gets the turn 60 s after the first.
    let third = admit(&a, "wx").await.expect("within the hold");
    assert_eq!(third.wait, Duration::from_secs(60));
    clock.0.store(at("2026-12-03T04:05:00Z"), Ordering::SeqCst);
    assert_eq!(admit(&a, "wx").await.expect("later").wait, Duration::ZERO);
}

#[tokio::test]
async fn overrides_set_their_own_budget() {
    let mut s = settings(10, "");
    s.overrides.insert(
        "careful".into(),
        AccountOverride {
            daily_limit: Some(1),
            active_hours: None,
            per_app_min_interval: None,
            per_app_concurrency: None,
        },
    );
    let (a, _) = keeper(s, 0, "2026-12-03T04:00:00Z");
    admit(&a, "careful").await.expect("one");
    assert!(matches!(
        admit(&a, "careful").await,
        Err(Rest::DailyLimit(_))
    ));
    admit(&a, "other").await.expect("the default limit");
    assert_eq!(a.policy("careful").daily_limit, Some(1));
    assert_eq!(
        a.policies()
            .too_often(["发送失败", "操作过于频繁，请稍后再试"]),
        Some("操作过于频繁，请稍后再试")
    );
    assert_eq!(a.policies().too_often(["user ticket invalid"]), None);
}
