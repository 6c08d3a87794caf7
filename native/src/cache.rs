//! The graph's long-lived caches in compact form: identifier owners and packed profiles.
//!
//! Each cache is a hash table of 4-byte offsets into an arena of 256 KiB chunks. A record there is a varint
//! length, the key (varint-length-prefixed: an identifier key, a profile id), then the value. These caches
//! are what grows with the number of identifiers, so they set the core's memory per identifier (issue 4).
//! One heap block per entry in a table of boxed slices (0.4.5) took a 16-byte slot per bucket, and a
//! hashbrown table holds up to twice as many buckets as entries; the allocator's size classes and the pages
//! that replaced profiles leave half empty came on top. Here a bucket takes 4 bytes, and a chunk whose
//! replaced or removed records reach a quarter of it is compacted: its live records move to the newest chunk
//! and it is freed.

use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashTable;
use indexmap::IndexSet;
use rustc_hash::FxHasher;

/// Records start at multiples of `UNIT` bytes: an offset is a chunk number and a unit within the chunk, in
/// 32 bits, so a cache holds at most 65,536 chunks (16 GiB).
const UNIT: usize = 4;
const UNIT_BITS: u32 = 16;
const CHUNK_BYTES: usize = UNIT << UNIT_BITS;
const MAX_CHUNKS: usize = 1 << (32 - UNIT_BITS);

fn hash(key: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(key);
    h.finish()
}

/// `n` as a LEB128 varint, as `put_uint` appends it, spelled into `buf` instead (no heap block: a record's
/// key length is written per owner).
fn varint(mut n: u64, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = 0;
    while n >= 0x80 {
        buf[at] = (n as u8) | 0x80;
        n >>= 7;
        at += 1;
    }
    buf[at] = n as u8;
    &buf[..=at]
}

/// Append `n` as a LEB128 varint: the records' lengths and key lengths, and the packed profile form (whose
/// first field, the id, is thereby its record's key). Its own loop, not `varint`'s: the packing loops inline
/// it (through `varint` it was a call per field, 3 % more instructions per link).
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

/// The bytes a record of an `len`-byte entry takes in a chunk: its length, the entry, padding to a unit.
fn stride(len: usize) -> usize {
    (varint(len as u64, &mut [0; 10]).len() + len).next_multiple_of(UNIT)
}

struct Chunk {
    /// the records, each padded to a unit; the capacity is `CHUNK_BYTES`, or one record's stride for a
    /// record larger than that (a profile with a large `extra`), which gets a chunk of its own
    bytes: Vec<u8>,
    /// strides of the records replaced or removed since they were written
    garbage: usize,
    queued: bool,
}

/// The chunks, and which of them wait to be compacted.
#[derive(Default)]
struct Arena {
    chunks: Vec<Option<Chunk>>,
    free: Vec<u32>,
    /// the chunk records are appended to; it is compacted only once another takes its place
    head: Option<u32>,
    pending: Vec<u32>,
    held: usize,
    compactions: u64,
}

fn offset(chunk: u32, at: usize) -> u32 {
    (chunk << UNIT_BITS) | (at / UNIT) as u32
}

fn locate(off: u32) -> (usize, usize) {
    (
        (off >> UNIT_BITS) as usize,
        (off as usize & ((1 << UNIT_BITS) - 1)) * UNIT,
    )
}

impl Arena {
    /// The entry whose record starts at `off`.
    fn entry(&self, off: u32) -> &[u8] {
        let (c, mut at) = locate(off);
        let bytes = &self.chunks[c]
            .as_ref()
            .expect("an offset names a live chunk")
            .bytes;
        let len = get_uint(bytes, &mut at) as usize;
        &bytes[at..at + len]
    }

    /// Write a record of the entry made of `parts` (`len` bytes in all); its offset.
    fn append(&mut self, len: usize, parts: &[&[u8]]) -> u32 {
        let need = stride(len);
        let c = if need > CHUNK_BYTES {
            self.new_chunk(need)
        } else {
            match self.head {
                Some(h) if self.chunk(h).bytes.len() + need <= CHUNK_BYTES => h,
                old => {
                    let h = self.new_chunk(CHUNK_BYTES);
                    self.head = Some(h);
                    if let Some(old) = old {
                        self.check(old);
                    }
                    h
                }
            }
        };
        let bytes = &mut self.chunks[c as usize].as_mut().expect("just chosen").bytes;
        let at = bytes.len();
        put_uint(bytes, len as u64);
        for part in parts {
            bytes.extend_from_slice(part);
        }
        bytes.resize(at + need, 0);
        offset(c, at)
    }

    fn chunk(&self, c: u32) -> &Chunk {
        self.chunks[c as usize].as_ref().expect("a live chunk")
    }

    fn new_chunk(&mut self, capacity: usize) -> u32 {
        let chunk = Chunk {
            bytes: Vec::with_capacity(capacity),
            garbage: 0,
            queued: false,
        };
        self.held += chunk.bytes.capacity();
        match self.free.pop() {
            Some(c) => {
                self.chunks[c as usize] = Some(chunk);
                c
            }
            None => {
                assert!(
                    self.chunks.len() < MAX_CHUNKS,
                    "a native cache outgrew 16 GiB: lower cache_identifiers or cold_profiles"
                );
                self.chunks.push(Some(chunk));
                (self.chunks.len() - 1) as u32
            }
        }
    }

    /// Count the record at `off` as garbage; the length of its entry.
    fn release(&mut self, off: u32) -> usize {
        let (c, mut at) = locate(off);
        let chunk = self.chunks[c]
            .as_mut()
            .expect("an offset names a live chunk");
        let len = get_uint(&chunk.bytes, &mut at) as usize;
        chunk.garbage += stride(len);
        self.check(c as u32);
        len
    }

    /// Queue chunk `c` for compaction once a quarter of it is garbage, unless records are still appended
    /// to it.
    fn check(&mut self, c: u32) {
        if self.head == Some(c) {
            return;
        }
        let chunk = self.chunks[c as usize].as_mut().expect("a live chunk");
        if !chunk.queued && chunk.garbage * 4 >= chunk.bytes.len() {
            chunk.queued = true;
            self.pending.push(c);
        }
    }
}

/// Byte entries keyed by the length-prefixed string they start with (an identifier key, a profile id).
#[derive(Default)]
pub struct Keyed {
    table: HashTable<u32>,
    arena: Arena,
    /// the live entries' bytes, for `Engine.cache_sizes`
    bytes: usize,
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

    /// The chunks' bytes, garbage and free room included (the table's buckets not).
    pub fn held(&self) -> usize {
        self.arena.held
    }

    pub fn compactions(&self) -> u64 {
        self.arena.compactions
    }

    pub fn clear(&mut self) {
        *self = Keyed::default();
    }

    /// The whole entry stored under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        let key = key.as_bytes();
        let arena = &self.arena;
        self.table
            .find(hash(key), |&o| key_of(arena.entry(o)) == key)
            .map(|&o| arena.entry(o))
    }

    /// The value stored under `key` (the entry after its key).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.get(key).map(value_of)
    }

    /// Remove the entry stored under `key`; its bytes.
    pub fn take(&mut self, key: &str) -> Option<Vec<u8>> {
        let off = self.unlink(key)?;
        let e = self.arena.entry(off).to_vec();
        self.forget(off);
        Some(e)
    }

    /// Remove the entry stored under `key`, if any.
    pub fn remove(&mut self, key: &str) {
        if let Some(off) = self.unlink(key) {
            self.forget(off);
        }
    }

    fn unlink(&mut self, key: &str) -> Option<u32> {
        let key = key.as_bytes();
        let arena = &self.arena;
        match self
            .table
            .find_entry(hash(key), |&o| key_of(arena.entry(o)) == key)
        {
            Ok(found) => Some(found.remove().0),
            Err(_) => None,
        }
    }

    fn forget(&mut self, off: u32) {
        self.bytes -= self.arena.release(off);
        self.compact_pending();
    }

    /// Store an entry (`Profile::pack`'s bytes, or one taken from another table), replacing the one with
    /// the same key.
    pub fn put(&mut self, e: &[u8]) {
        self.store(key_of(e), e.len(), &[e]);
    }

    /// Store the entry of `key` and `value`.
    pub fn put_pair(&mut self, key: &str, value: &[u8]) {
        let key = key.as_bytes();
        let mut buf = [0; 10];
        let prefix = varint(key.len() as u64, &mut buf);
        let len = prefix.len() + key.len() + value.len();
        self.store(key, len, &[prefix, key, value]);
    }

    fn store(&mut self, key: &[u8], len: usize, parts: &[&[u8]]) {
        let off = self.arena.append(len, parts);
        self.bytes += len;
        let arena = &self.arena;
        let replaced = match self.table.entry(
            hash(key),
            |&o| key_of(arena.entry(o)) == key,
            |&o| hash(key_of(arena.entry(o))),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut slot) => {
                Some(std::mem::replace(slot.get_mut(), off))
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(off);
                None
            }
        };
        match replaced {
            Some(old) => self.forget(old),
            None => self.compact_pending(),
        }
    }

    /// Move the live records of every chunk queued by `Arena::check` to the head chunk and free it. A record
    /// is live when the table still points at it; the rest are what replaced and removed entries left.
    fn compact_pending(&mut self) {
        while let Some(c) = self.arena.pending.pop() {
            let chunk = self.arena.chunks[c as usize]
                .take()
                .expect("a queued chunk is live");
            let mut at = 0;
            while chunk.garbage < chunk.bytes.len() && at < chunk.bytes.len() {
                let mut start = at;
                let len = get_uint(&chunk.bytes, &mut start) as usize;
                let e = &chunk.bytes[start..start + len];
                let (off, h) = (offset(c, at), hash(key_of(e)));
                if let Some(slot) = self.table.find_mut(h, |&o| o == off) {
                    *slot = self.arena.append(len, &[e]);
                }
                at += stride(len);
            }
            self.arena.held -= chunk.bytes.capacity();
            self.arena.free.push(c);
            self.arena.compactions += 1;
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
