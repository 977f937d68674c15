//! What an operator sees of one account (contract §8 `GET /api/accounts`):
//! the shape shared by the budget keeper that knows it and the console and
//! CLI that show it, so neither side invents its own copy.

use serde::{Deserialize, Serialize};

/// Why an account's commands are not sent right now, or that they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// Commands are sent as pacing allows.
    Active,
    /// `accounts.daily_limit` reached for the account's day.
    OverLimit,
    /// Outside `accounts.active_hours`.
    OutsideHours,
    /// WeChat said "too often"; resting for `accounts.cooldown`.
    CoolingDown,
    /// Paused by an operator.
    Paused,
}

impl AccountState {
    /// The contract's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Active => "active",
            AccountState::OverLimit => "over_limit",
            AccountState::OutsideHours => "outside_hours",
            AccountState::CoolingDown => "cooling_down",
            AccountState::Paused => "paused",
        }
    }
}

/// One row of `GET /api/accounts`. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountView {
    /// The account's `appId`.
    pub app_id: String,
    /// What its commands meet now.
    pub state: AccountState,
    /// Requests that reached WeChat in the account's current day.
    pub sent_today: u32,
    /// Its daily limit; `null` when it has none.
    pub daily_limit: Option<u32>,
    /// When the current rest (cooldown, pause with a duration, over limit,
    /// outside hours) ends; `null` when active or paused until resumed.
    pub resting_until: Option<String>,
    /// The operator's pause reason, or WeChat's text that started a cooldown.
    pub reason: Option<String>,
    /// When its last request was sent.
    pub last_sent_at: Option<String>,
    /// Its last request's outcome: `succeeded` or an error kind.
    pub last_outcome: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_the_contract_names_it() {
        let view = AccountView {
            app_id: "wx_a".into(),
            state: AccountState::CoolingDown,
            sent_today: 3,
            daily_limit: None,
            resting_until: Some("2026-12-03T18:00:00.000Z".into()),
            reason: Some("操作过于频繁".into()),
            last_sent_at: None,
            last_outcome: Some("rejected".into()),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"appId": "wx_a", "state": "cooling_down", "sentToday": 3,
                "dailyLimit": null, "restingUntil": "2026-12-03T18:00:00.000Z",
                "reason": "操作过于频繁", "lastSentAt": null, "lastOutcome": "rejected"})
        );
        assert_eq!(AccountState::OverLimit.as_str(), "over_limit");
    }
}
