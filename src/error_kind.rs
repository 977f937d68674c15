//! The stable error kinds of the contract (§4) and what each one means for
//! the worker.
//!
//! Every policy question about a failure is answered here, on the kind,
//! by an exhaustive match (no `_` arm: a new kind does not compile until
//! each question has its answer): whether it is retried with backoff
//! ([`ErrorKind::retryable`]), parked in a delay queue
//! ([`ErrorKind::parkable`]), counted by the circuit breaker
//! ([`ErrorKind::systemic`]), and stored for the commandId
//! ([`ErrorKind::definitive`]).

use serde::{Deserialize, Serialize};

/// The stable error kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message is not a valid command.
    InvalidCommand,
    /// GeWe refused the token.
    Unauthorized,
    /// The account behind `appId` is offline or unknown.
    AppOffline,
    /// Any other business refusal by GeWe.
    Rejected,
    /// GeWe could not be reached or kept failing transiently.
    UpstreamUnavailable,
    /// GeWe answered something the worker cannot use.
    UnexpectedResponse,
    /// The command waited for its account longer than `accounts.max_wait`
    /// and was never sent.
    Expired,
}

impl ErrorKind {
    /// Every kind, in [`ErrorKind::index`] order.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::InvalidCommand,
        ErrorKind::Unauthorized,
        ErrorKind::AppOffline,
        ErrorKind::Rejected,
        ErrorKind::UpstreamUnavailable,
        ErrorKind::UnexpectedResponse,
        ErrorKind::Expired,
    ];

    /// Position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            ErrorKind::InvalidCommand => 0,
            ErrorKind::Unauthorized => 1,
            ErrorKind::AppOffline => 2,
            ErrorKind::Rejected => 3,
            ErrorKind::UpstreamUnavailable => 4,
            ErrorKind::UnexpectedResponse => 5,
            ErrorKind::Expired => 6,
        }
    }

    /// The snake_case name used in events, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidCommand => "invalid_command",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::AppOffline => "app_offline",
            ErrorKind::Rejected => "rejected",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::UnexpectedResponse => "unexpected_response",
            ErrorKind::Expired => "expired",
        }
    }

    /// Whether the worker retries this kind (with backoff), and what the
    /// event's `retryable` says.
    pub fn retryable(self) -> bool {
        match self {
            ErrorKind::UpstreamUnavailable => true,
            ErrorKind::InvalidCommand
            | ErrorKind::Unauthorized
            | ErrorKind::AppOffline
            | ErrorKind::Rejected
            | ErrorKind::UnexpectedResponse
            | ErrorKind::Expired => false,
        }
    }

    /// Whether a command that ended with this kind may be tried again
    /// later from a delay queue (`retry.park`): the account or GeWe was
    /// unreachable, so GeWe did not act on the request.
    pub fn parkable(self) -> bool {
        match self {
            ErrorKind::AppOffline | ErrorKind::UpstreamUnavailable => true,
            ErrorKind::InvalidCommand
            | ErrorKind::Unauthorized
            | ErrorKind::Rejected
            | ErrorKind::UnexpectedResponse
            | ErrorKind::Expired => false,
        }
    }

    /// Whether this kind says GeWe itself is failing, for every command
    /// alike: what the circuit breaker counts.
    pub fn systemic(self) -> bool {
        match self {
            ErrorKind::UpstreamUnavailable | ErrorKind::Unauthorized => true,
            ErrorKind::InvalidCommand
            | ErrorKind::AppOffline
            | ErrorKind::Rejected
            | ErrorKind::UnexpectedResponse
            | ErrorKind::Expired => false,
        }
    }

    /// Whether GeWe may have acted on a request that ended with this kind,
    /// so the outcome is kept for the commandId and never asked for again:
    /// `rejected` and `unexpected_response`. The others say the request did
    /// not get through (`upstream_unavailable`, `unauthorized`,
    /// `app_offline`) or was never sent (`invalid_command`), so a later
    /// copy tries again once the cause is fixed. `expired` was never sent
    /// either, but it is final by design: a copy gets the same answer
    /// instead of waiting for the account all over again.
    pub fn definitive(self) -> bool {
        match self {
            ErrorKind::Rejected | ErrorKind::UnexpectedResponse | ErrorKind::Expired => true,
            ErrorKind::InvalidCommand
            | ErrorKind::Unauthorized
            | ErrorKind::AppOffline
            | ErrorKind::UpstreamUnavailable => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each policy as the set of kinds it holds for.
    fn holding(policy: fn(ErrorKind) -> bool) -> Vec<ErrorKind> {
        ErrorKind::ALL.into_iter().filter(|k| policy(*k)).collect()
    }

    #[test]
    fn each_policy_holds_for_the_kinds_the_contract_names() {
        use ErrorKind::*;
        assert_eq!(holding(ErrorKind::retryable), [UpstreamUnavailable]);
        assert_eq!(
            holding(ErrorKind::parkable),
            [AppOffline, UpstreamUnavailable]
        );
        assert_eq!(
            holding(ErrorKind::systemic),
            [Unauthorized, UpstreamUnavailable]
        );
        assert_eq!(
            holding(ErrorKind::definitive),
            [Rejected, UnexpectedResponse, Expired]
        );
    }

    #[test]
    fn all_is_in_index_order() {
        for (i, kind) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
    }
}
