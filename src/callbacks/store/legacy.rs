//! The remembered `v3`s earlier versions wrote, still read so that a
//! callback for a request sent before an upgrade matches. They expire
//! within `callbacks.match_window` of the upgrade, and this module can go
//! in the release after that.
//!
//! - `<prefix>:v3h:<hex SHA-256 of (appId, v3)>`: a hash, one field per
//!   commandId, its JSON record (fields, whether confirmed, when).
//! - Before that, `<prefix>:v3:<len(appId)>:<appId>:<v3>`: one JSON record,
//!   written once the `succeeded` event was confirmed.

use serde::Deserialize;

use super::{Fields, Phase, packed::Unpacked, v3_digest};
use crate::redis_client::{RedisClient, RedisError};

/// The time given to a record of the oldest layout, which kept none: it
/// sorts first and is not aged out by the store (its key's expiry does).
pub const AT: u64 = 0;

/// A record in a `v3h` hash.
#[derive(Debug, Deserialize)]
struct Hashed {
    #[serde(flatten)]
    fields: Fields,
    confirmed: bool,
    at: u64,
}

/// A record of the oldest layout.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Keyed {
    command_id: String,
    #[serde(flatten)]
    fields: Fields,
}

/// What earlier versions remembered for `(app_id, v3)`, in one round trip.
/// Records this version cannot read are logged and match nothing.
pub async fn lookup(
    client: &RedisClient,
    prefix: &str,
    app_id: &str,
    v3: &str,
) -> Result<Vec<Unpacked>, RedisError> {
    let digest: String = v3_digest(app_id, v3)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut pipe = redis::pipe();
    pipe.hgetall(format!("{prefix}:v3h:{digest}"))
        .get(format!("{prefix}:v3:{}:{app_id}:{v3}", app_id.len()));
    let (hashed, keyed): (Vec<(String, String)>, Option<String>) = client.query(&pipe).await?;
    let mut found = Vec::with_capacity(hashed.len() + 1);
    if let Some(json) = keyed {
        match serde_json::from_str::<Keyed>(&json) {
            Ok(k) => found.push(Unpacked {
                command_id: k.command_id,
                fields: k.fields,
                phase: Phase::Confirmed,
                at: AT,
            }),
            Err(e) => {
                tracing::error!(%app_id, error = %e, "Redis holds a remembered v3 of an earlier version this one cannot read; it matches nothing");
            }
        }
    }
    for (command_id, json) in hashed {
        match serde_json::from_str::<Hashed>(&json) {
            Ok(h) => found.push(Unpacked {
                command_id,
                fields: h.fields,
                phase: if h.confirmed {
                    Phase::Confirmed
                } else {
                    Phase::Pending
                },
                at: h.at,
            }),
            Err(e) => {
                tracing::error!(%app_id, %command_id, error = %e, "Redis holds a remembered v3 of an earlier version this one cannot read; it matches nothing");
            }
        }
    }
    Ok(found)
}
