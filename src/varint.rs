//! LEB128 varints: the lengths and counts of the records packed into Redis
//! ([`crate::buckets`]), where most values fit one byte.

/// Appends `n`, seven bits a byte.
pub fn put(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The number `bytes` start with and what follows it; `None` when they end
/// before it does.
pub fn read(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut n: u32 = 0;
    for (i, b) in bytes.iter().enumerate().take(5) {
        n |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_the_round_trip_and_a_cut_is_noticed() {
        for n in [0, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            put(&mut out, n);
            out.push(9);
            assert_eq!(read(&out), Some((n, &[9u8][..])));
            assert_eq!(read(&out[..out.len() - 2]), None, "{n}");
        }
    }
}
