//! A list of human durations, as `retry.park` takes it: a TOML list
//! (`["1m", "10m", "1h"]`) or, from the environment, one comma-separated
//! string (`1m,10m,1h`).

use std::{fmt, time::Duration};

use serde::{
    Deserializer, Serializer,
    de::{self, SeqAccess, Visitor},
    ser::SerializeSeq,
};

/// Deserializes a list of human durations from a sequence or a
/// comma-separated string; an empty string is an empty list.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    d.deserialize_any(DurationList)
}

/// Serializes as a list of human duration strings.
pub fn serialize<S: Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(list.len()))?;
    for d in list {
        seq.serialize_element(&humantime::format_duration(*d).to_string())?;
    }
    seq.end()
}

struct DurationList;

fn parse<E: de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text.trim())
        .map_err(|e| E::custom(format!("`{}` is not a duration: {e}", text.trim())))
}

impl<'de> Visitor<'de> for DurationList {
    type Value = Vec<Duration>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of durations such as [\"1m\", \"10m\"], or \"1m,10m\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        text.split(',').map(parse).collect()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(text) = seq.next_element::<String>()? {
            out.push(parse(&text)?);
        }
        Ok(out)
    }
}
