//! W3C trace context (`traceparent`) propagation without a tracing backend.
//!
//! A command's `traceparent` header makes the worker's handling of it a
//! child span of the caller's: the command's log entry records the trace id,
//! its own new span id and the parent id, and the result event carries
//! `traceparent` = same trace, this span as parent,
//! so a tracing system can stitch publisher → worker → consumer together.

use rand::Rng;

/// A parsed `traceparent` header (version 00).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// 2 hex digits.
    pub flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parses a header; `None` for anything malformed (it is then ignored,
    /// as the W3C spec requires, instead of failing the command).
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = is_hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.next().is_none())
            && is_hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && is_hex(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && is_hex(flags, 2);
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// A new span id for the worker's span and the header naming it as parent.
    pub fn child(&self) -> (String, String) {
        let span_id = format!("{:016x}", rand::rng().random_range(1..=u64::MAX));
        let header = format!("00-{}-{}-{}", self.trace_id, span_id, self.flags);
        (span_id, header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_derives_a_child() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let (span, header) = tp.child();
        assert_eq!(span.len(), 16);
        assert_ne!(span, tp.parent_id);
        assert_eq!(
            header,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")
        );
        assert_eq!(
            TraceParent::parse(&header).map(|t| t.trace_id),
            Some(tp.trace_id)
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
