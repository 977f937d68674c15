//! The GeWe boundary: one HTTP attempt ([`client`]), the exhaustive
//! classification of its result ([`classify`]) and the retry policy that
//! decides, after each attempt, whether to wait and try again ([`retry`]).
//! The attempts themselves are made by the processor, which puts each one
//! through the breaker and pacing first.

pub mod classify;
pub mod client;
pub mod retry;

pub use classify::{Verdict, classify};
pub use client::{Answer, GeweClient, TransportError};
pub use retry::{RetryPolicy, Step, Tally};

/// Path of the endpoint the worker calls.
pub const ADD_MEMBER_PATH: &str = "/gewe/v2/api/group/addGroupMemberAsFriend";
/// Header carrying the token.
pub const TOKEN_HEADER: &str = "X-GEWE-TOKEN";
