//! Profile ids and neighbour codes, bit for bit as `streams/core/ids.py` and `state.py` make them.

use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const MAX_TS: i64 = (1 << 48) - 1;
/// Above the 16 bits of a type tag: a neighbour code naming a profile (shared-device detection).
const PEOPLE_TAG: i64 = 1 << 16;

fn push_pair(out: &mut String, v: u32) {
    out.push(ALPHABET[((v >> 5) & 31) as usize] as char);
    out.push(ALPHABET[(v & 31) as usize] as char);
}

/// ULID text and the 80 hashed bits it carries.
fn ulid(timestamp_ms: i64, seed: &[u8]) -> (String, u128) {
    let ts = timestamp_ms.clamp(0, MAX_TS) as u64;
    let mut hasher = Blake2bVar::new(10).expect("10 is a valid blake2b digest size");
    hasher.update(seed);
    let mut digest = [0u8; 10];
    hasher
        .finalize_variable(&mut digest)
        .expect("digest buffer has the requested size");
    let r = digest
        .iter()
        .fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    let mut out = String::with_capacity(26);
    for shift in [40u32, 30, 20, 10, 0] {
        push_pair(&mut out, ((ts >> shift) & 1023) as u32);
    }
    for shift in [70u32, 60, 50, 40, 30, 20, 10, 0] {
        push_pair(&mut out, ((r >> shift) & 1023) as u32);
    }
    (out, r)
}

/// `derive_profile_id_where`: the first variant of the event's id that `accept`s (last 10 bits stepped, then salted).
pub fn derive_profile_id_where(
    event_id: &str,
    at_ms: i64,
    mut accept: impl FnMut(&str) -> bool,
) -> String {
    let mut salt: u64 = 0;
    loop {
        let seed = if salt == 0 {
            event_id.to_owned()
        } else {
            format!("{event_id}#{salt}")
        };
        let (base, r) = ulid(at_ms, seed.as_bytes());
        let last = (r & 1023) as u32;
        let mut pid = String::with_capacity(26);
        for step in 0..1024u32 {
            pid.clear();
            pid.push_str(&base[..24]);
            push_pair(&mut pid, (last + step) & 1023);
            if accept(&pid) {
                return pid;
            }
        }
        salt += 1;
    }
}

/// A ULID's text as its 128 bits, when the text is exactly what `ulid_text` makes of them (the graph's ids
/// are): 26 characters of the alphabet, the first at most 7.
pub fn ulid_bits(text: &str) -> Option<u128> {
    let text = text.as_bytes();
    if text.len() != 26 || text[0] > b'7' {
        return None;
    }
    text.iter().try_fold(0u128, |acc, c| {
        let digit = ALPHABET.iter().position(|a| a == c)?;
        Some((acc << 5) | digit as u128)
    })
}

/// The text of a ULID's 128 bits (ASCII), spelled into `buf`.
pub fn ulid_text(bits: u128, buf: &mut [u8; 26]) -> &str {
    for (i, c) in buf.iter_mut().enumerate() {
        *c = ALPHABET[((bits >> (5 * (25 - i))) & 31) as usize];
    }
    std::str::from_utf8(buf).expect("the alphabet is ASCII")
}

/// `neighbour_code`: 16-bit tag of the key's type, crc32 of the key.
pub fn neighbour_code(key: &str) -> i64 {
    let type_part = key.split_once(':').map_or(key, |(t, _)| t);
    ((i64::from(crc32fast::hash(type_part.as_bytes())) & 0xFFFF) << 32)
        | i64::from(crc32fast::hash(key.as_bytes()))
}

/// `people_code`: a profile a weak value was seen with.
pub fn people_code(profile_id: &str) -> i64 {
    (PEOPLE_TAG << 32) | i64::from(crc32fast::hash(profile_id.as_bytes()))
}

/// `count_people`: how many people codes a neighbour list holds.
pub fn count_people(codes: &[i64]) -> usize {
    codes.iter().filter(|c| *c >> 32 == PEOPLE_TAG).count()
}
