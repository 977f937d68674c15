//! Connections to the broker's nodes (`amqp.url`, `amqp.tls.*`).
//!
//! `amqp.url` may list the nodes of one cluster; a [`Connector`] connects to
//! one node at a time, each attempt bounded by [`CONNECT_TIMEOUT`] (a
//! listener that accepts but never speaks AMQP would otherwise hold lapin's
//! connect forever). TLS failures are told apart so that the log says what
//! to change: an untrusted broker certificate names `amqp.tls.ca_file`, a
//! missing client certificate names `amqp.tls.client_cert_file`.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder, tcp::OwnedTLSConfig};

use crate::config::{AmqpSettings, ConfigError, broker_urls, redact_url_password};

/// Longest wait for one node to complete TCP, TLS and AMQP handshakes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame the worker proposes, unless `amqp.url` sets
/// `frame_max` itself. lapin keeps send and receive buffers of 32 frames
/// each: at RabbitMQ's default of 128 KiB that is 8 MiB resident for
/// messages of a few hundred bytes; at 16 KiB, 1 MiB. Larger bodies are
/// split into several frames, as AMQP does anyway.
pub const FRAME_MAX: u32 = 16 * 1024;

/// Why one node could not be connected to. Every variant names the node by
/// its URL with the password masked.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No complete handshake within [`CONNECT_TIMEOUT`].
    #[error("broker node {node} did not answer within {}s", after.as_secs())]
    Timeout {
        /// The node, password masked.
        node: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The node's certificate was rejected by this worker.
    #[error("the certificate of broker node {node} was not trusted ({reason}): {hint}")]
    UntrustedCertificate {
        /// The node, password masked.
        node: String,
        /// rustls' verdict.
        reason: String,
        /// What the operator can change.
        hint: &'static str,
    },
    /// The node rejected this worker's side of the TLS handshake.
    #[error("broker node {node} refused the TLS handshake ({reason}): {hint}")]
    ClientCertificateRefused {
        /// The node, password masked.
        node: String,
        /// The TLS alert the node sent.
        reason: String,
        /// What the operator can change.
        hint: &'static str,
    },
    /// Anything else: refused, unreachable, authentication, vhost, protocol.
    #[error("could not connect to broker node {node}: {source}")]
    Failed {
        /// The node, password masked.
        node: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

struct Node {
    url: String,
    /// `url` with its password masked.
    shown: String,
}

/// The nodes of `amqp.url` and the TLS settings to reach them with.
pub struct Connector {
    nodes: Vec<Node>,
    tls: OwnedTLSConfig,
    /// Whether `amqp.tls.client_cert_file` is set.
    client_cert: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.shown.as_str()).collect();
        f.debug_struct("Connector").field("nodes", &nodes).finish()
    }
}

impl Connector {
    /// Reads the node list and the TLS files of `a` (validated settings
    /// cannot fail here unless a TLS file changed since).
    pub fn new(a: &AmqpSettings) -> Result<Self, ConfigError> {
        let nodes = broker_urls(&a.url)
            .map(|url| Node {
                url: with_frame_max(url),
                shown: redact_url_password(url),
            })
            .collect();
        Ok(Self {
            nodes,
            tls: a.tls.load()?,
            client_cert: a.tls.client_cert_file.is_some(),
        })
    }

    /// How many nodes `amqp.url` lists (at least one).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `node`'s URL with its password masked.
    pub fn shown(&self, node: usize) -> &str {
        &self.nodes[node % self.nodes.len()].shown
    }

    /// Connects to node `node` (an index into `amqp.url`, taken modulo
    /// [`Connector::len`]).
    pub async fn connect(
        &self,
        node: usize,
        properties: ConnectionProperties,
    ) -> Result<Connection, ConnectError> {
        // Never empty: splitting a string yields at least one entry.
        let n = &self.nodes[node % self.nodes.len()];
        let without_cert = !self.client_cert && n.url.starts_with("amqps://");
        let failed = |source| classify(&n.shown, without_cert, source);
        let builder = DefaultConnectionBuilder::new()
            .map_err(failed)?
            .with_uri_str(n.url.clone())
            .with_properties(properties)
            .with_tls_config(self.tls.clone());
        match tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(ConnectError::Timeout {
                node: n.shown.clone(),
                after: CONNECT_TIMEOUT,
            }),
        }
    }

    /// Connects to the first node that answers, in the order of `amqp.url`
    /// (for short-lived clients: `publish`, the demo, tests). On failure,
    /// the error of every node.
    pub async fn connect_first(
        &self,
        properties: ConnectionProperties,
    ) -> Result<Connection, NoNodeAnswered> {
        let mut errors = Vec::with_capacity(self.len());
        for node in 0..self.len() {
            match self.connect(node, properties.clone()).await {
                Ok(connection) => return Ok(connection),
                Err(e) => errors.push(e),
            }
        }
        Err(NoNodeAnswered(errors))
    }
}

/// `url` proposing [`FRAME_MAX`], unless it names a `frame_max` itself.
fn with_frame_max(url: &str) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}frame_max={FRAME_MAX}")
}

/// Every node of `amqp.url` failed; one error per node, in order.
#[derive(Debug, thiserror::Error)]
#[error("no broker node answered: {}", list(.0))]
pub struct NoNodeAnswered(pub Vec<ConnectError>);

fn list(errors: &[ConnectError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Tells TLS verdicts apart from other connection failures.
/// `without_cert`: a TLS node reached without a client certificate.
fn classify(node: &str, without_cert: bool, source: lapin::Error) -> ConnectError {
    let node = node.to_owned();
    if without_cert && closed_at_once(&source) {
        // A broker that requires a client certificate sends its alert and
        // closes; the client has often written its first AMQP bytes by then
        // and reads the reset, not the alert.
        return ConnectError::ClientCertificateRefused {
            reason: "the connection was closed right after the TLS handshake".to_owned(),
            hint: "the broker probably requires a client certificate: set amqp.tls.client_cert_file and amqp.tls.client_key_file",
            node,
        };
    }
    match tls_error(&source) {
        Some(rustls::Error::InvalidCertificate(e)) => ConnectError::UntrustedCertificate {
            reason: format!("{e}"),
            hint: certificate_hint(e),
            node,
        },
        Some(rustls::Error::AlertReceived(alert)) => ConnectError::ClientCertificateRefused {
            reason: format!("TLS alert {alert:?}"),
            hint: alert_hint(*alert),
            node,
        },
        Some(_) | None => ConnectError::Failed { node, source },
    }
}

fn certificate_hint(e: &rustls::CertificateError) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer | C::BadSignature => {
            "set amqp.tls.ca_file to the PEM file of the CA that signed the broker's certificate"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "use a host name in amqp.url that the broker's certificate names"
        }
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            "the broker's certificate is outside its validity period (or this machine's clock is off)"
        }
        // rustls' list is open-ended; these need a look at the certificate.
        _ => "check the broker's certificate and amqp.tls.ca_file",
    }
}

fn alert_hint(alert: rustls::AlertDescription) -> &'static str {
    use rustls::AlertDescription as A;
    match alert {
        A::CertificateRequired | A::HandshakeFailure => {
            "the broker requires a client certificate: set amqp.tls.client_cert_file and amqp.tls.client_key_file"
        }
        A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::AccessDenied => {
            "the broker did not accept the client certificate of amqp.tls.client_cert_file (is it signed by a CA the broker trusts?)"
        }
        // Protocol-level alerts (versions, ciphers): nothing to configure here.
        _ => "the broker's TLS settings and this client's do not match",
    }
}

/// Whether the node reset or closed the connection (no TLS verdict).
fn closed_at_once(e: &lapin::Error) -> bool {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return false;
    };
    tls_error(e).is_none()
        && matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionAborted
        )
}

/// The rustls error inside lapin's I/O error, if the failure was TLS.
fn tls_error(e: &lapin::Error) -> Option<&rustls::Error> {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return None;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_smaller_frame_is_proposed_unless_the_url_names_one() {
        assert_eq!(
            with_frame_max("amqp://u:p@h:5672/%2f"),
            "amqp://u:p@h:5672/%2f?frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqps://h/v?heartbeat=10"),
            "amqps://h/v?heartbeat=10&frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/v?frame_max=4096"),
            "amqp://h/v?frame_max=4096"
        );
        for url in ["amqp://u:p@h:5672/%2f", "amqps://h/v?heartbeat=10"] {
            let parsed: lapin::uri::AMQPUri = with_frame_max(url).parse().expect("parses");
            assert_eq!(parsed.query.frame_max, Some(FRAME_MAX));
        }
    }
}
