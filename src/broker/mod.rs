//! Everything that talks AMQP: the connection and its channels
//! ([`session`]), the topology ([`topology`]) and confirmed publishing
//! ([`publisher`]).

pub mod publisher;
pub mod session;
pub mod topology;

pub use publisher::{PublishError, Publisher};
pub use session::{Session, SessionError};
pub use topology::TopologyError;
