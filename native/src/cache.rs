//! The graph's long-lived caches in compact form: identifier owners and packed profiles.
//!
//! Both hold one heap block per entry — a varint-length-prefixed key followed by the value — in a hash table
//! of boxed byte slices. A `HashMap<String, Rc<str>>` owner took about 140 bytes an identifier (the slot, the
//! key's block, the counted id's block); one block and a 16-byte slot take about 75. These caches are what
//! grows with the number of identifiers, so they set the core's memory per identifier (issue 4).

use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashTable;
use indexmap::IndexSet;
use rustc_hash::FxHasher;

/// Byte entries keyed by the length-prefixed string they start with (an identifier key, a profile id).
#[derive(Default)]
pub struct Keyed {
    table: HashTable<Box<[u8]>>,
    /// the entries' bytes, for `Engine.cache_sizes`
    bytes: usize,
}

fn hash(key: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(key);
    h.finish()
}

/// Append `n` as a LEB128 varint: the entries' key lengths and the packed profile form (whose first field,
/// the id, is thereby its entry's key).
pub fn put_uint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Read a varint written by `put_uint` at `*at`, moving `*at` past it.
pub fn get_uint(raw: &[u8], at: &mut usize) -> u64 {
    let (mut n, mut shift) = (0u64, 0);
    loop {
        let b = raw[*at];
        *at += 1;
        n |= u64::from(b & 0x7F) << shift;
        if b < 0x80 {
            return n;
        }
        shift += 7;
    }
}

/// Where the key starts and ends in an entry.
fn key_span(entry: &[u8]) -> (usize, usize) {
    let mut at = 0;
    let len = get_uint(entry, &mut at) as usize;
    (at, at + len)
}

fn key_of(entry: &[u8]) -> &[u8] {
    let (start, end) = key_span(entry);
    &entry[start..end]
}

/// The value of an entry (what follows its key).
pub fn value_of(entry: &[u8]) -> &[u8] {
    &entry[key_span(entry).1..]
}

/// An entry: the key, length-prefixed, then `value`.
pub fn entry(key: &str, value: &[u8]) -> Box<[u8]> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 2);
    put_uint(&mut out, key.len() as u64);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    out.into_boxed_slice()
}

impl Keyed {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.table.clear();
        self.bytes = 0;
    }

    /// The whole entry stored under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        let key = key.as_bytes();
        self.table
            .find(hash(key), |e| key_of(e) == key)
            .map(|e| &e[..])
    }

    /// The value stored under `key` (the entry after its key).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.get(key).map(value_of)
    }

    pub fn take(&mut self, key: &str) -> Option<Box<[u8]>> {
        let key = key.as_bytes();
        match self.table.find_entry(hash(key), |e| key_of(e) == key) {
            Ok(found) => {
                let e = found.remove().0;
                self.bytes -= e.len();
                Some(e)
            }
            Err(_) => None,
        }
    }

    /// Store an entry made by `entry` (or taken from another table), replacing one with the same key.
    pub fn put(&mut self, e: Box<[u8]>) {
        let h = hash(key_of(&e));
        self.bytes += e.len();
        match self
            .table
            .entry(h, |old| key_of(old) == key_of(&e), |old| hash(key_of(old)))
        {
            hashbrown::hash_table::Entry::Occupied(mut slot) => {
                self.bytes -= slot.get().len();
                *slot.get_mut() = e;
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(e);
            }
        }
    }
}

/// Names that recur in every profile (sources, channels, identifier types, currencies, the status), packed
/// as small numbers. Codes are never reused, so a packed profile reads back the same for the graph's
/// lifetime. Past `MAX_SYMBOLS` distinct names (free-form input), and for names over `MAX_SYMBOL_BYTES`
/// (validation caps a source or channel at 64 characters), the text is packed instead: the table stays small.
#[derive(Default)]
pub struct Symbols {
    names: IndexSet<Box<str>, BuildHasherDefault<FxHasher>>, // a name's code is its index
}

const MAX_SYMBOLS: usize = 4096;
const MAX_SYMBOL_BYTES: usize = 64;

impl Symbols {
    pub fn code(&mut self, name: &str) -> Option<u32> {
        if let Some(c) = self.names.get_index_of(name) {
            return Some(c as u32);
        }
        if self.names.len() >= MAX_SYMBOLS || name.len() > MAX_SYMBOL_BYTES {
            return None;
        }
        Some(self.names.insert_full(Box::from(name)).0 as u32)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn name(&self, code: u32) -> &str {
        &self.names[code as usize]
    }
}
