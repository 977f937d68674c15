//! The `add_friend.accepted` event (contract §6) and its publication.

use serde::{Deserialize, Serialize};

#[cfg(test)]
use super::store::Fields;
use super::store::Sent;
use crate::{
    broker::Publisher,
    outbound::{OutboundError, properties},
};

/// Routing key (and AMQP `type`) of the accepted event.
pub const ROUTING_ACCEPTED: &str = "add_friend.accepted";

/// The only status of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accepted {
    /// The member accepted the friend request.
    Accepted,
}

/// An accepted event, exactly as serialised on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedEvent {
    /// The original command's id.
    pub command_id: String,
    /// Always `accepted`.
    pub status: Accepted,
    /// The account.
    pub app_id: String,
    /// The group.
    pub chatroom_id: String,
    /// The member asked.
    pub member_wxid: String,
    /// The request's ticket, as GeWe sent it back.
    pub v3: String,
    /// `Data.UserName.string` of the callback: the new friend's wxid
    /// (absent only when GeWe's callback lacks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub friend_wxid: Option<String>,
    /// When the callback reached the worker (RFC 3339).
    pub received_at: String,
    /// When the worker matched it to the command (RFC 3339).
    pub accepted_at: String,
}

impl AcceptedEvent {
    /// The event for `sent`'s command, accepted by `friend_wxid`.
    pub fn new(
        sent: &Sent,
        friend_wxid: Option<&str>,
        received_at: String,
        accepted_at: String,
    ) -> Self {
        Self {
            command_id: sent.command_id.clone(),
            status: Accepted::Accepted,
            app_id: sent.app_id.clone(),
            chatroom_id: sent.fields.chatroom_id.clone(),
            member_wxid: sent.fields.member_wxid.clone(),
            v3: sent.v3.clone(),
            friend_wxid: friend_wxid.map(str::to_owned),
            received_at,
            accepted_at,
        }
    }
}

/// Publishes `event` to the result exchange, `mandatory` and confirmed,
/// with the original command's `correlation_id` (contract §4, §6). An event
/// no queue would receive is not delivered, as for the other events.
pub async fn publish(
    result_exchange: &str,
    event: &AcceptedEvent,
    correlation_id: &str,
    publisher: &Publisher,
) -> Result<(), OutboundError> {
    let body = serde_json::to_vec(event)?;
    let properties = properties(correlation_id, ROUTING_ACCEPTED, None);
    publisher
        .publish(result_exchange, ROUTING_ACCEPTED, true, &body, properties)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_has_the_contract_shape() {
        let sent = Sent {
            command_id: "c1".into(),
            app_id: "wx_a".into(),
            v3: "v3_x@stranger".into(),
            fields: Fields {
                chatroom_id: "1@chatroom".into(),
                member_wxid: "wxid_m".into(),
                correlation_id: "corr".into(),
                completed_at: "2024-05-01T08:00:00.000Z".into(),
            },
        };
        let e = AcceptedEvent::new(&sent, Some("wxid_f"), "t0".into(), "t1".into());
        let v = serde_json::to_value(&e).expect("serialises");
        assert_eq!(
            v,
            serde_json::json!({
                "commandId": "c1", "status": "accepted", "appId": "wx_a",
                "chatroomId": "1@chatroom", "memberWxid": "wxid_m", "v3": "v3_x@stranger",
                "friendWxid": "wxid_f", "receivedAt": "t0", "acceptedAt": "t1"
            })
        );
        let without = AcceptedEvent::new(&sent, None, "t0".into(), "t1".into());
        let v = serde_json::to_value(&without).expect("serialises");
        assert!(v.get("friendWxid").is_none());
    }
}
