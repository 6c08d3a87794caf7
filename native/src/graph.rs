//! `IdentityGraph.link` (streams/core/graph.py) step for step, over the same store keys and bytes.
//!
//! Profiles are shared `Rc<RefCell<_>>`, as the Python code shares profile objects between the cache, the
//! dirty set and the link step's locals; identifier records are copied where Python moves a shared list
//! (pending → other, absorb), which behaves the same because the source is dropped. Everything but `link`
//! (erase events, split, explain, lookups) stays in Python, which reads and writes the same store.

use std::borrow::Cow;
use std::cell::RefCell;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

use indexmap::{IndexMap, IndexSet};
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet, FxHasher};
use serde_json::{Map, Value};

use crate::cache::{value_of, Keyed, Symbols};
use crate::ids::{
    count_people, derive_profile_id_where, neighbour_code, people_code, ulid_bits, ulid_text,
};
use crate::rules::{contains, Ident, Rules};
use crate::state::{bump, put_int, put_opt_str, put_str, put_strs, Profile, Rec, MERGED};

pub type P = Rc<RefCell<Profile>>;
type Fx = BuildHasherDefault<FxHasher>;
type Pid = Rc<str>;

const STATS_KEY: &[u8] = b"m:stats";
const NEIGHBOUR_INDEX_KEY: &[u8] = b"m:neighbour-index";
/// The first byte of an owner held as a ULID's bits (`Graph::owner_value`): no UTF-8 text holds it.
const ULID_TAG: u8 = 0xFF;
const STAT_NAMES: [&str; 8] = [
    "events",
    "profiles_created",
    "profiles_live",
    "merges",
    "splits",
    "erased",
    "generic",
    "shared",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Created,
    Attached,
    Merged,
    Refused,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Created => "profile_created",
            Kind::Attached => "identifiers_attached",
            Kind::Merged => "profiles_merged",
            Kind::Refused => "merge_refused",
        }
    }
}

/// A change's payload, in the key order the Python graph builds its dict.
#[derive(Clone, Debug)]
pub enum Payload {
    Created {
        identifiers: Vec<String>,
        anchor: String,
    },
    Attached {
        identifier: String,
        bridge: Vec<String>,
    },
    Merged {
        merged: String,
        moved: Vec<String>,
        bridge: Vec<String>,
        bridge_other: Vec<String>,
    },
    Refused {
        rule: String,
        detail: String,
        identifiers: Vec<String>,
        other: Option<String>,
    },
}

/// One payload value, as both the stored history entry and the `LinkResult`'s dict hold it.
pub enum Field<'a> {
    Str(&'a str),
    Strs(&'a [String]),
    OptStr(Option<&'a str>),
}

impl Payload {
    /// (key, value) in the key order the Python graph builds its dict: the one list both outputs follow.
    pub fn fields(&self) -> Vec<(&'static str, Field<'_>)> {
        match self {
            Payload::Created {
                identifiers,
                anchor,
            } => {
                vec![
                    ("identifiers", Field::Strs(identifiers)),
                    ("anchor", Field::Str(anchor)),
                ]
            }
            Payload::Attached { identifier, bridge } => {
                vec![
                    ("identifier", Field::Str(identifier)),
                    ("bridge", Field::Strs(bridge)),
                ]
            }
            Payload::Merged {
                merged,
                moved,
                bridge,
                bridge_other,
            } => vec![
                ("merged_profile_id", Field::Str(merged)),
                ("identifiers_moved", Field::Strs(moved)),
                ("bridge", Field::Strs(bridge)),
                ("bridge_other", Field::Strs(bridge_other)),
            ],
            Payload::Refused {
                rule,
                detail,
                identifiers,
                other,
            } => vec![
                ("rule", Field::Str(rule)),
                ("detail", Field::Str(detail)),
                ("identifiers", Field::Strs(identifiers)),
                ("other_profile_id", Field::OptStr(other.as_deref())),
            ],
        }
    }

    fn write_json(&self, o: &mut Vec<u8>) {
        for (i, (key, value)) in self.fields().into_iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            put_str(o, key);
            o.push(b':');
            match value {
                Field::Str(s) => put_str(o, s),
                Field::Strs(v) => put_strs(o, v),
                Field::OptStr(s) => put_opt_str(o, s),
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Change {
    pub kind: Kind,
    pub profile_id: String,
    pub seq: i64,
    pub event_id: String,
    pub at: i64,
    pub payload: Payload,
}

/// What `link` needs of a `NormalizedEvent`; an order keeps its attributes, read as `record_event` reads them.
pub struct Event<'a> {
    /// borrowed from the Python strings, which the caller holds while the event is linked
    pub id: &'a str,
    pub source: &'a str,
    pub channel: &'a str,
    pub at: i64,
    pub idents: Vec<Ident>,
    pub is_order: bool,
    pub attributes: Option<Py<PyAny>>,
}

/// A row of a flush's write batch: its key, and its value (`None` deletes it).
type BatchItem<'a, 'py> = (Cow<'a, [u8]>, Option<Bound<'py, PyBytes>>);

/// An owner as `Graph::owner_key` reads it.
#[derive(PartialEq)]
enum OwnerKey {
    Ulid(u128),
    Text(Pid),
}

impl OwnerKey {
    fn text<'a>(&'a self, buf: &'a mut [u8; 26]) -> &'a str {
        match self {
            OwnerKey::Ulid(bits) => ulid_text(*bits, buf),
            OwnerKey::Text(pid) => pid,
        }
    }
}

pub struct LinkOut {
    pub profile_id: Option<String>,
    pub changes: Vec<Change>,
    pub anchor: Option<String>,
}

/// A refusal emitted at the end of `link` against the event's final profile.
struct Pending {
    rule: String,
    detail: String,
    identifiers: Vec<String>,
    other: Option<String>,
}

pub struct Graph {
    pub rules: Rules,
    store: Py<PyAny>,
    decimal: Py<PyAny>,
    invalid_operation: Py<PyAny>,
    cache_profiles: usize,
    cold_profiles: usize,
    cache_identifiers: usize,
    flush_every: i64,
    history: bool,
    p_young: HashMap<String, P>,
    p_old: HashMap<String, P>,
    /// profiles as `Profile::pack` bytes under the decoded ones: a hot-cache miss is a short decode
    b_young: Keyed,
    b_old: Keyed,
    /// identifier → owning profile id ("" = known to have none)
    i_young: Keyed,
    i_old: Keyed,
    syms: Symbols,
    dirty_p: IndexMap<String, P, Fx>,
    /// profiles written since they were last packed, still decoded: packed once, when they leave the decoded
    /// caches, however many flushes wrote them meanwhile
    repack: HashSet<String>,
    /// dirty profiles that left the decoded caches before the flush, as the rows the flush will write: a
    /// batch of many events holds their bytes, not their decoded structs (about 4× the size)
    spilled: IndexMap<String, Vec<u8>, Fx>,
    dirty_i: IndexSet<String, Fx>, // owners changed since the flush; their values are in `i_young`
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    since_flush: i64,
    i_complete: bool,
    p_complete: bool,
    generic: HashSet<String>,
    pub stats: Map<String, Value>,
    /// events linked since `stats["events"]` was last brought up to date, apart from the first, which went
    /// through `inc` (so a stored counter that is no number fails at an event, as in Python): a map update
    /// per event was 2 % of a link
    uncounted_events: i64,
    window_counted: bool,
}

fn seen_with(code: i64, key: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(15 + key.len());
    row.extend_from_slice(b"n:");
    push_padded(&mut row, code as u64, 16, 12); // `{code:012x}`: codes are 48 bits
    row.push(b':');
    row.extend_from_slice(key.as_bytes());
    row
}

/// `n` in `radix` (10 or 16, lowercase), zero-padded to `width`, as `format!("{n:0width$}")` writes it: the
/// key of every history and neighbour row, written without the formatting machinery (a tenth of a link's
/// instructions went to it, with the identifier keys)
fn push_padded(out: &mut Vec<u8>, mut n: u64, radix: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    let len = (digits.len() - at).max(width);
    out.extend_from_slice(&digits[digits.len() - len..]);
}

/// `h:<profile>:<seq, 10 digits>`: a profile's history rows sort by sequence number
fn history_key(pid: &str, seq: i64) -> Vec<u8> {
    let Ok(unsigned) = u64::try_from(seq) else {
        return format!("h:{pid}:{seq:010}").into_bytes(); // a hand-edited state's; the sign comes first
    };
    let mut key = Vec::with_capacity(pid.len() + 14);
    key.extend_from_slice(b"h:");
    key.extend_from_slice(pid.as_bytes());
    key.push(b':');
    push_padded(&mut key, unsigned, 10, 10);
    key
}

fn py_err(e: String) -> PyErr {
    PyValueError::new_err(e)
}

impl Graph {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        py: Python<'_>,
        store: Py<PyAny>,
        rules: Rules,
        cache_profiles: usize,
        cold_profiles: usize,
        cache_identifiers: usize,
        flush_every: i64,
        history: bool,
    ) -> PyResult<Graph> {
        let decimal_module = py.import_bound("decimal")?;
        let mut g = Graph {
            rules,
            store,
            decimal: decimal_module.getattr("Decimal")?.unbind(),
            invalid_operation: decimal_module.getattr("InvalidOperation")?.unbind(),
            cache_profiles: cache_profiles.max(1),
            cold_profiles,
            cache_identifiers: cache_identifiers.max(1),
            flush_every: flush_every.max(1),
            history,
            p_young: HashMap::default(),
            p_old: HashMap::default(),
            b_young: Keyed::default(),
            b_old: Keyed::default(),
            i_young: Keyed::default(),
            i_old: Keyed::default(),
            syms: Symbols::default(),
            dirty_p: IndexMap::default(),
            repack: HashSet::default(),
            spilled: IndexMap::default(),
            dirty_i: IndexSet::default(),
            writes: Vec::new(),
            since_flush: 0,
            i_complete: false,
            p_complete: false,
            generic: HashSet::default(),
            stats: Map::new(),
            uncounted_events: 0,
            window_counted: false,
        };
        g.load(py)?;
        Ok(g)
    }

    fn store_has(&self, py: Python<'_>, prefix: &[u8]) -> PyResult<bool> {
        let it = self
            .store
            .bind(py)
            .call_method1("iter_prefix", (PyBytes::new_bound(py, prefix),))?;
        let first = it.iter()?.next();
        match first {
            None => Ok(false),
            Some(r) => r.map(|_| true),
        }
    }

    fn store_get(&self, py: Python<'_>, key: &[u8]) -> PyResult<Option<Vec<u8>>> {
        let v = self
            .store
            .bind(py)
            .call_method1("get", (PyBytes::new_bound(py, key),))?;
        if v.is_none() {
            Ok(None)
        } else {
            Ok(Some(v.extract::<Vec<u8>>()?))
        }
    }

    /// (Re)read what the Python graph's constructor reads: generic marks, stats, whether the store is new.
    pub fn load(&mut self, py: Python<'_>) -> PyResult<()> {
        self.forget();
        self.i_complete = !self.store_has(py, b"i:")?;
        let no_profiles = !self.store_has(py, b"p:")?;
        self.p_complete = self.cold_profiles > 0 && no_profiles;
        let indexed = self.store_get(py, NEIGHBOUR_INDEX_KEY)?.is_some();
        if !indexed && no_profiles {
            self.writes
                .push((NEIGHBOUR_INDEX_KEY.to_vec(), Some(b"1".to_vec())));
        }
        self.generic.clear();
        let marks = self
            .store
            .bind(py)
            .call_method1("iter_prefix", (PyBytes::new_bound(py, b"g:"),))?;
        for item in marks.iter()? {
            // b"1" generic, b"s" shared: to the link step both are values that no longer link
            let (k, _mark): (Vec<u8>, Vec<u8>) = item?.extract()?;
            let key = String::from_utf8(k[2..].to_vec()).map_err(|e| py_err(e.to_string()))?;
            self.generic.insert(key);
        }
        self.stats = match self.store_get(py, STATS_KEY)? {
            None => Map::new(),
            Some(raw) => match serde_json::from_slice(&raw) {
                Ok(Value::Object(m)) => m,
                _ => return Err(py_err("m:stats is not a JSON object".into())),
            },
        };
        self.uncounted_events = 0;
        self.window_counted = false;
        for name in STAT_NAMES {
            self.stats.entry(name).or_insert(Value::from(0));
        }
        self.stats
            .entry("refusals")
            .or_insert(Value::Object(Map::new()));
        Ok(())
    }

    /// What the caches hold: (name, count) pairs for `Engine.cache_sizes`.
    /// `*_arena_bytes` are the chunks holding the entries (their garbage and free room included), and
    /// `arena_compactions` the chunks compacted so far (both generations of both caches).
    pub fn cache_sizes(&self) -> [(&'static str, usize); 9] {
        let caches = [&self.b_young, &self.b_old, &self.i_young, &self.i_old];
        [
            ("decoded_profiles", self.p_young.len() + self.p_old.len()),
            ("packed_profiles", self.b_young.len() + self.b_old.len()),
            (
                "packed_profile_bytes",
                self.b_young.bytes() + self.b_old.bytes(),
            ),
            (
                "packed_profile_arena_bytes",
                self.b_young.held() + self.b_old.held(),
            ),
            ("owners", self.i_young.len() + self.i_old.len()),
            ("owner_bytes", self.i_young.bytes() + self.i_old.bytes()),
            ("owner_arena_bytes", self.i_young.held() + self.i_old.held()),
            (
                "arena_compactions",
                caches.iter().map(|c| c.compactions() as usize).sum(),
            ),
            ("symbols", self.syms.len()),
        ]
    }

    /// Drop every cached profile and owner (the store is about to change under us).
    pub fn forget(&mut self) {
        self.p_young.clear();
        self.p_old.clear();
        self.b_young.clear();
        self.b_old.clear();
        self.repack.clear();
        self.i_young.clear();
        self.i_old.clear();
    }

    fn inc(&mut self, name: &str, delta: i64) -> PyResult<()> {
        match self.stats.get_mut(name) {
            Some(v) => *v = Self::plus(v, delta, name)?,
            None => {
                self.stats.insert(name.to_owned(), Value::from(delta));
            }
        }
        Ok(())
    }

    /// `stats["events"] += 1`, in `uncounted_events` after the flush window's first event.
    fn count_event(&mut self) -> PyResult<()> {
        if self.window_counted {
            self.uncounted_events += 1;
            return Ok(());
        }
        self.inc("events", 1)?;
        self.window_counted = true;
        Ok(())
    }

    /// Bring `stats` up to date before it is read or written.
    pub fn fold_counters(&mut self) -> PyResult<()> {
        let n = std::mem::take(&mut self.uncounted_events);
        if self.stats.get("events").is_some_and(Value::is_i64) {
            if n > 0 {
                self.inc("events", n)?;
            }
        } else {
            for _ in 0..n {
                self.inc("events", 1)?; // a float counter: Python adds one at a time, and rounds each time
            }
        }
        self.window_counted = false;
        Ok(())
    }

    fn plus(v: &Value, delta: i64, name: &str) -> PyResult<Value> {
        if let Some(n) = v.as_i64() {
            return Ok(Value::from(n + delta));
        }
        match v.as_f64() {
            Some(x) => Ok(Value::from(x + delta as f64)),
            None => Err(PyTypeError::new_err(format!(
                "m:stats counter {name} is not a number: {v}"
            ))),
        }
    }

    fn refused(&mut self, rule: &str) -> PyResult<()> {
        match self.stats.get_mut("refusals") {
            Some(Value::Object(m)) => {
                let n = match m.get(rule) {
                    Some(v) => Self::plus(v, 1, rule)?,
                    None => Value::from(1),
                };
                m.insert(rule.to_owned(), n);
                Ok(())
            }
            _ => Err(PyTypeError::new_err("m:stats refusals is not an object")),
        }
    }

    // --- cache / store plumbing ----------------------------------------------------------------

    fn get_profile(&mut self, py: Python<'_>, pid: &str) -> PyResult<Option<P>> {
        if let Some(p) = self.p_young.get(pid) {
            return Ok(Some(p.clone()));
        }
        if let Some((pid, p)) = self.p_old.remove_entry(pid) {
            self.p_young.insert(pid, p.clone());
            return Ok(Some(p));
        }
        let profile = match self.b_young.get(pid) {
            Some(packed) => Profile::unpack(packed, &self.syms),
            None => match self.b_old.take(pid) {
                Some(packed) => {
                    let profile = Profile::unpack(&packed, &self.syms);
                    self.b_young.put(&packed);
                    profile
                }
                None => {
                    let raw = match self.spilled.get(pid) {
                        Some(row) => row.clone(),
                        None => {
                            if self.p_complete {
                                return Ok(None);
                            }
                            let mut key = b"p:".to_vec();
                            key.extend_from_slice(pid.as_bytes());
                            let Some(raw) = self.store_get(py, &key)? else {
                                return Ok(None);
                            };
                            raw
                        }
                    };
                    let mut profile = Profile::from_stored(&raw).map_err(py_err)?;
                    // `ProfileState.decode` reads revenue with Decimal(...) and `encode` writes str(...): a
                    // non-canonical string ("+10.00") comes back canonical, an invalid one raises
                    for (_, amount) in profile.revenue.iter_mut() {
                        *amount = self
                            .decimal
                            .bind(py)
                            .call1((amount.as_str(),))?
                            .str()?
                            .extract()?;
                    }
                    if self.cold_profiles > 0 {
                        self.b_young.put(&profile.pack(&mut self.syms));
                    }
                    profile
                }
            },
        };
        let p = Rc::new(RefCell::new(profile));
        self.p_young.insert(pid.to_owned(), p.clone());
        Ok(Some(p))
    }

    fn live(&mut self, py: Python<'_>, pid: &str) -> PyResult<Option<P>> {
        let mut p = self.get_profile(py, pid)?;
        loop {
            let next = match &p {
                Some(q) => {
                    let q = q.borrow();
                    if q.status == MERGED {
                        q.merged_into.clone()
                    } else {
                        None
                    }
                }
                None => None,
            };
            match next {
                Some(into) => p = self.get_profile(py, &into)?,
                None => return Ok(p),
            }
        }
    }

    fn owner(&mut self, py: Python<'_>, key: &str) -> PyResult<Option<Pid>> {
        self.owner_as(py, key, Self::pid_of)
    }

    /// The owner of `key` as `read` makes it of the cached value.
    fn owner_as<T>(
        &mut self,
        py: Python<'_>,
        key: &str,
        read: fn(&[u8]) -> Option<T>,
    ) -> PyResult<Option<T>> {
        if let Some(pid) = self.i_young.value(key) {
            return Ok(read(pid));
        }
        if let Some(e) = self.i_old.take(key) {
            let pid = read(value_of(&e));
            self.i_young.put(&e);
            return Ok(pid);
        }
        let pid = if self.i_complete {
            Vec::new()
        } else {
            let mut k = b"i:".to_vec();
            k.extend_from_slice(key.as_bytes());
            let raw = self.store_get(py, &k)?.unwrap_or_default();
            let pid = String::from_utf8(raw).map_err(|e| py_err(e.to_string()))?;
            if pid.is_empty() {
                Vec::new()
            } else {
                Self::owner_value(&pid)
            }
        };
        self.i_young.put_pair(key, &pid);
        Ok(read(&pid))
    }

    fn pid_of(value: &[u8]) -> Option<Pid> {
        (!value.is_empty()).then(|| Rc::from(Self::owner_text(value, &mut [0; 26])))
    }

    /// An owner compared as the cache holds it: the hot path reads one per identifier and spells only the
    /// profile's id, once (equal values are equal ids: `owner_value` is a function of the id).
    fn owner_key(value: &[u8]) -> Option<OwnerKey> {
        match value.split_first() {
            None => None,
            Some((&ULID_TAG, bits)) => Some(OwnerKey::Ulid(u128::from_be_bytes(
                bits.try_into().expect("a tagged owner holds 16 bytes"),
            ))),
            Some(_) => Some(OwnerKey::Text(Rc::from(
                std::str::from_utf8(value).expect("cached as UTF-8"),
            ))),
        }
    }

    /// An owner as the cache holds it: nothing for none, `ULID_TAG` and the 16 bytes of a ULID (9 bytes
    /// fewer than its text, and every id the graph makes is one), else the id's text, which as UTF-8 never
    /// holds the tag's byte.
    fn owner_value(pid: &str) -> Vec<u8> {
        match ulid_bits(pid) {
            Some(bits) => {
                let mut out = Vec::with_capacity(17);
                out.push(ULID_TAG);
                out.extend_from_slice(&bits.to_be_bytes());
                out
            }
            None => pid.as_bytes().to_vec(),
        }
    }

    /// The owner's id: a ULID spelled into `buf` (no heap block: `owner` reads one per identifier), or the
    /// text held.
    fn owner_text<'a>(value: &'a [u8], buf: &'a mut [u8; 26]) -> &'a str {
        match value.split_first() {
            Some((&ULID_TAG, bits)) => ulid_text(
                u128::from_be_bytes(bits.try_into().expect("a tagged owner holds 16 bytes")),
                buf,
            ),
            _ => std::str::from_utf8(value).expect("cached as UTF-8"),
        }
    }

    fn set_owner(&mut self, key: &str, pid: &str) {
        self.i_young.put_pair(key, &Self::owner_value(pid));
        self.dirty_i.insert(key.to_owned());
    }

    /// Past `cache_profiles` decoded profiles, drop the older generation. A dirty profile in it is encoded
    /// now (its row waits in `spilled` for the flush), and it and any profile written since it was last
    /// packed are packed, so the decoded caches stay near twice their size however many events a batch holds.
    fn rotate_profiles(&mut self) {
        let dropped = std::mem::replace(&mut self.p_old, std::mem::take(&mut self.p_young));
        if self.dirty_p.is_empty() && self.repack.is_empty() {
            return;
        }
        for (pid, p) in dropped {
            let dirty = self.dirty_p.swap_remove(&pid);
            if !self.repack.remove(&pid) && dirty.is_none() {
                continue;
            }
            let q = dirty.as_ref().unwrap_or(&p).borrow();
            if self.cold_profiles > 0 {
                self.b_old.remove(&pid);
                self.b_young.put(&q.pack(&mut self.syms));
            }
            if dirty.is_some() {
                self.spilled.insert(pid, q.to_row());
            }
        }
    }

    fn touch(&mut self, p: &P) {
        let q = p.borrow();
        match self.dirty_p.get_mut(q.id.as_str()) {
            Some(slot) => *slot = p.clone(),
            None => {
                self.dirty_p.insert(q.id.clone(), p.clone());
            }
        }
    }

    /// Write every buffered change to the store in one batch, then trim the caches.
    pub fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        self.fold_counters()?;
        // In key order (stable: a key written twice keeps its last value): RocksDB inserts each into its
        // memtable's skip list from where the previous one went, instead of searching from the top, and the
        // inserts were a fifth of a link's instructions.
        let mut items: Vec<BatchItem<'_, '_>> = Vec::with_capacity(
            self.spilled.len() + self.dirty_p.len() + self.dirty_i.len() + self.writes.len() + 1,
        );
        let keep = self.cold_profiles > 0;
        for (pid, row) in &self.spilled {
            if self.dirty_p.contains_key(pid) {
                continue; // touched again since: written below as it is now
            }
            let mut key = b"p:".to_vec();
            key.extend_from_slice(pid.as_bytes());
            items.push((key.into(), Some(PyBytes::new_bound(py, row))));
        }
        for (pid, p) in &self.dirty_p {
            let mut key = b"p:".to_vec();
            key.extend_from_slice(pid.as_bytes());
            let row = PyBytes::new_bound(py, &p.borrow().to_row());
            items.push((key.into(), Some(row)));
            if keep {
                self.repack.insert(pid.clone()); // packed when it leaves the decoded caches
            }
        }
        let mut buf = [0u8; 26];
        for ident in &self.dirty_i {
            let mut key = b"i:".to_vec();
            key.extend_from_slice(ident.as_bytes());
            // `i_young` rotates and clears only after a flush has written these
            let owner = self
                .i_young
                .value(ident)
                .expect("a changed owner stays cached until the flush");
            let owner = Self::owner_text(owner, &mut buf);
            items.push((key.into(), Some(PyBytes::new_bound(py, owner.as_bytes()))));
        }
        for (key, value) in &self.writes {
            let value = value.as_ref().map(|v| PyBytes::new_bound(py, v));
            items.push((Cow::Borrowed(key.as_slice()), value));
        }
        let stats = serde_json::to_vec(&self.stats).map_err(|e| py_err(e.to_string()))?;
        items.push((
            Cow::Borrowed(STATS_KEY),
            Some(PyBytes::new_bound(py, &stats)),
        ));
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let items = PyList::new_bound(
            py,
            items
                .into_iter()
                .map(|(key, value)| (PyBytes::new_bound(py, &key), value)),
        );
        self.store.bind(py).call_method1("write_batch", (items,))?;
        self.dirty_p.clear();
        self.spilled.clear();
        self.dirty_i.clear();
        self.writes.clear();
        self.since_flush = 0;
        if self.p_young.len() > self.cache_profiles {
            self.rotate_profiles();
        }
        if self.b_young.len() > self.cold_profiles {
            self.p_complete = self.p_complete && self.b_old.is_empty();
            self.b_old = std::mem::take(&mut self.b_young);
        }
        if self.i_young.len() > self.cache_identifiers {
            self.i_complete = self.i_complete && self.i_old.is_empty();
            self.i_old = std::mem::take(&mut self.i_young);
        }
        Ok(())
    }

    // --- changes ------------------------------------------------------------------------------

    fn emit(
        &mut self,
        out: &mut Vec<Change>,
        p: &P,
        kind: Kind,
        ev_id: &str,
        at: i64,
        payload: Payload,
    ) {
        let (pid, seq) = {
            let mut q = p.borrow_mut();
            q.seq += 1;
            (q.id.clone(), q.seq)
        };
        self.touch(p);
        if self.history {
            let hkey = history_key(&pid, seq);
            let mut entry = Vec::with_capacity(160);
            entry.extend_from_slice(b"{\"k\":");
            put_str(&mut entry, kind.name());
            entry.extend_from_slice(b",\"e\":");
            put_str(&mut entry, ev_id);
            entry.extend_from_slice(b",\"t\":");
            put_int(&mut entry, at);
            entry.push(b',');
            payload.write_json(&mut entry);
            entry.push(b'}');
            self.writes.push((hkey.clone(), Some(entry)));
            if let Payload::Refused { identifiers, .. } = &payload {
                for key in identifiers {
                    let mut rkey = Vec::with_capacity(key.len() + hkey.len() + 1);
                    rkey.extend_from_slice(b"r:");
                    rkey.extend_from_slice(key.as_bytes());
                    rkey.extend_from_slice(&hkey[1..]); // `:<profile>:<seq>`
                    self.writes.push((rkey, Some(hkey.clone())));
                }
            }
        }
        out.push(Change {
            kind,
            profile_id: pid,
            seq,
            event_id: ev_id.to_owned(),
            at,
            payload,
        });
    }

    // --- aggregates ---------------------------------------------------------------------------

    fn add_money(
        &self,
        py: Python<'_>,
        held: Option<&str>,
        amount: &Bound<'_, PyAny>,
    ) -> PyResult<String> {
        let dec = self.decimal.bind(py);
        let base = dec.call1((held.unwrap_or("0"),))?;
        base.add(amount)?.str()?.extract() // `+`, as Python sums
    }

    /// `ProfileState.record_event`: the order's revenue sum first, so one that raises (decimal's Overflow)
    /// leaves the profile as it was.
    fn record_event(&self, py: Python<'_>, p: &mut Profile, ev: &Event) -> PyResult<()> {
        let revenue = match ev.attributes.as_ref().filter(|_| ev.is_order) {
            Some(attrs) => self.order_revenue(py, p, attrs.bind(py))?,
            None => None,
        };
        let at = ev.at;
        p.events += 1;
        if at > p.last {
            p.last = at;
        }
        if at < p.first {
            p.first = at;
        }
        bump(&mut p.channels, ev.channel, 1, at);
        bump(&mut p.sources, ev.source, 1, at);
        if ev.is_order {
            p.orders += 1;
        }
        if let Some((currency, sum)) = revenue {
            match p.revenue.iter().position(|(c, _)| *c == currency) {
                Some(i) => p.revenue[i].1 = sum,
                None => p.revenue.push((currency, sum)),
            }
        }
        Ok(())
    }

    /// `ProfileState._order_revenue`: (currency, its revenue with this order's total), or None for an order
    /// without a usable total.
    fn order_revenue(
        &self,
        py: Python<'_>,
        p: &Profile,
        attrs: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(String, String)>> {
        let total = attrs.call_method1(pyo3::intern!(py, "get"), (pyo3::intern!(py, "total"),))?;
        if total.is_none() {
            return Ok(None);
        }
        // a Decimal as is, anything else through its string; one Decimal refuses counts as an order, no revenue
        let decimal = self.decimal.bind(py);
        let amount = if total.is_instance(decimal)? {
            total
        } else {
            match decimal.call1((total.str()?,)) {
                Ok(amount) => amount,
                Err(e) if e.is_instance_bound(py, self.invalid_operation.bind(py)) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        };
        let currency =
            attrs.call_method1(pyo3::intern!(py, "get"), (pyo3::intern!(py, "currency"),))?;
        let currency: String = if currency.is_truthy()? {
            currency.str()?.extract()?
        } else {
            "XXX".to_owned()
        };
        let held = p.revenue.iter().find(|(c, _)| *c == currency);
        let sum = self.add_money(py, held.map(|(_, amount)| amount.as_str()), &amount)?;
        Ok(Some((currency, sum)))
    }

    /// `ProfileState.absorb`: fold `b` into `a` (merge; `b` is the loser).
    /// The revenue sums come first: one that raises leaves both profiles as they were.
    fn absorb(&self, py: Python<'_>, a: &mut Profile, b: &Profile) -> PyResult<()> {
        let mut revenue = a.revenue.clone();
        for (cur, amount) in &b.revenue {
            let amount = self.decimal.bind(py).call1((amount.as_str(),))?;
            let held = revenue.iter().position(|(c, _)| c == cur);
            let sum = self.add_money(py, held.map(|i| revenue[i].1.as_str()), &amount)?;
            match held {
                Some(i) => revenue[i].1 = sum,
                None => revenue.push((cur.clone(), sum)),
            }
        }
        for (key, rec) in &b.ids {
            a.add_identifier(key.clone(), rec.clone());
        }
        a.first = a.first.min(b.first);
        a.last = a.last.max(b.last);
        a.events += b.events;
        a.orders += b.orders;
        a.revenue = revenue;
        for (name, count, last) in &b.channels {
            bump(&mut a.channels, name, *count, *last);
        }
        for (name, count, last) in &b.sources {
            bump(&mut a.sources, name, *count, *last);
        }
        if !b.apart.is_empty() {
            let before = a.apart.clone();
            a.apart
                .extend(b.apart.iter().filter(|pid| !before.contains(pid)).cloned());
        }
        a.merged_from.extend(b.merged_from.iter().cloned());
        a.merged_from.push(b.id.clone());
        for (k, v) in &b.extra {
            if !a.extra.iter().any(|(x, _)| x == k) {
                a.extra.push((k.clone(), v.clone()));
            }
        }
        Ok(())
    }

    // --- link ---------------------------------------------------------------------------------

    pub fn link(&mut self, py: Python<'_>, ev: &Event) -> PyResult<LinkOut> {
        self.count_event()?;
        self.since_flush += 1;
        if self.since_flush >= self.flush_every {
            self.flush(py)?;
        } else if self.p_young.len() > self.cache_profiles {
            self.rotate_profiles();
        }
        // hot path: every identifier known, none generic, all in one live profile
        let mut first: Option<OwnerKey> = None;
        let mut best: Option<(usize, usize)> = None; // (rank, index of the anchor)
        let mut hot = true;
        for (i, ident) in ev.idents.iter().enumerate() {
            let pid = self.owner_as(py, &ident.key, Self::owner_key)?;
            let Some(pid) = pid else {
                hot = false;
                break;
            };
            if self.generic.contains(&ident.key) || first.as_ref().is_some_and(|f| *f != pid) {
                hot = false;
                break;
            }
            first = Some(pid);
            let r = self.rules.rank_of(ident.typ());
            let better = match best {
                None => true,
                Some((br, bi)) => r < br || (r == br && ident.key < ev.idents[bi].key),
            };
            if better {
                best = Some((r, i));
            }
        }
        if hot {
            if let Some(first) = first {
                let mut buf = [0u8; 26];
                let first = first.text(&mut buf);
                if let Some(p) = self.get_profile(py, first)? {
                    let active = p.borrow().is_active();
                    if active {
                        {
                            let mut q = p.borrow_mut();
                            // what can raise before any change, as in Python: a record missing from the
                            // profile its owner row names, an order's revenue sum
                            if let Some(ident) = ev.idents.iter().find(|i| !q.holds(&i.key)) {
                                return Err(PyKeyError::new_err(ident.key.clone()));
                            }
                            self.record_event(py, &mut q, ev)?;
                            for ident in &ev.idents {
                                let rec = q.rec_mut(&ident.key).expect("checked above");
                                if ev.at > rec.last {
                                    rec.last = ev.at;
                                }
                                if ident.verified && !rec.verified {
                                    rec.verified = true;
                                    rec.verified_as = None;
                                }
                            }
                        }
                        self.touch(&p);
                        let anchor = best.map(|(_, i)| ev.idents[i].key.clone());
                        return Ok(LinkOut {
                            profile_id: Some(first.to_owned()),
                            changes: Vec::new(),
                            anchor,
                        });
                    }
                }
            }
        }
        // identifiers in priority order, generic values left out
        let mut order: Vec<usize> = (0..ev.idents.len()).collect();
        let rank: Vec<usize> = ev
            .idents
            .iter()
            .map(|i| self.rules.rank_of(i.typ()))
            .collect();
        order.sort_by(|&x, &y| (rank[x], &ev.idents[x].key).cmp(&(rank[y], &ev.idents[y].key)));
        for w in order.windows(2) {
            let (a, b) = (&ev.idents[w[0]], &ev.idents[w[1]]);
            if rank[w[0]] == rank[w[1]]
                && a.key == b.key
                && (a.typ() != b.typ() || a.verified != b.verified)
            {
                // Python's sort then compares the two Identifier objects, which have no order
                return Err(PyTypeError::new_err(
                    "'<' not supported between instances of 'Identifier' and 'Identifier'",
                ));
            }
        }
        let mut keys: Vec<String> = Vec::new();
        let mut idents: Vec<Ident> = Vec::new();
        let mut prev: Option<&str> = None;
        for &i in &order {
            let ident = &ev.idents[i];
            if !self.generic.contains(&ident.key) && prev != Some(ident.key.as_str()) {
                keys.push(ident.key.clone());
                idents.push(ident.clone());
            }
            prev = Some(ident.key.as_str());
        }
        if keys.is_empty() {
            return Ok(LinkOut {
                profile_id: None,
                changes: Vec::new(),
                anchor: None,
            });
        }
        let mut owners = Vec::with_capacity(keys.len());
        for k in &keys {
            owners.push(self.owner(py, k)?);
        }
        self.link_slow(py, ev, keys, idents, owners)
    }

    fn track_generic(
        &mut self,
        py: Python<'_>,
        keys: &[String],
        idents: &[Ident],
        owners: &[Option<Pid>],
        new_nb: &mut HashMap<String, Vec<i64>>,
    ) -> PyResult<Vec<usize>> {
        let mark = self.rules.generic_active();
        // (index, code, that type's most distinct neighbours)
        let strong: Vec<(usize, i64, i64)> = idents
            .iter()
            .enumerate()
            .filter_map(|(j, i)| {
                self.rules
                    .generic_max
                    .get(i.typ())
                    .map(|most| (j, neighbour_code(&i.key), *most))
            })
            .collect();
        if strong.is_empty() {
            return Ok(Vec::new());
        }
        let mut became = Vec::new();
        for (xi, ident) in idents.iter().enumerate() {
            if !contains(&self.rules.generic_types, ident.typ()) {
                continue;
            }
            let ox = owners[xi].clone();
            let add: Vec<(i64, i64)> = strong
                .iter()
                .filter(|(j, _, _)| *j != xi && (ox.is_none() || owners[*j] != ox))
                .map(|(_, code, most)| (*code, *most))
                .collect();
            if add.is_empty() {
                continue;
            }
            let mut index_writes: Vec<i64> = Vec::new();
            let mut turned = false;
            let mut check = |nb: &mut Vec<i64>, indexed: bool| {
                for (code, most) in &add {
                    if !nb.contains(code) {
                        nb.push(*code);
                        if indexed {
                            index_writes.push(*code);
                        }
                    }
                    let tag = code >> 32;
                    if mark && nb.iter().filter(|c| *c >> 32 == tag).count() as i64 > *most {
                        turned = true;
                        break;
                    }
                }
            };
            match &ox {
                None => check(new_nb.entry(keys[xi].clone()).or_default(), false),
                Some(ox) => {
                    let Some(p) = self.get_profile(py, ox)? else {
                        continue;
                    };
                    {
                        let mut q = p.borrow_mut();
                        let rec = q
                            .rec_mut(&keys[xi])
                            .ok_or_else(|| PyKeyError::new_err(keys[xi].clone()))?;
                        check(rec.nb.get_or_insert_with(Vec::new), true);
                    }
                    self.touch(&p);
                }
            }
            for code in index_writes {
                self.writes
                    .push((seen_with(code, &keys[xi]), Some(Vec::new())));
            }
            if turned {
                became.push(xi);
            }
        }
        Ok(became)
    }

    fn record(&mut self, ident: &Ident, ev: &Event, origin: &str, nb: Option<&Vec<i64>>) -> Rec {
        if let Some(codes) = nb {
            for code in codes {
                self.writes
                    .push((seen_with(*code, &ident.key), Some(Vec::new())));
            }
        }
        Rec {
            typ: ident.typ().to_owned(),
            first: ev.at,
            last: ev.at,
            source: ev.source.to_owned(),
            verified: ident.verified,
            verified_as: None,
            via: ev.id.to_owned(),
            origin: origin.to_owned(),
            nb: nb.cloned(),
        }
    }

    fn fresh_id(&mut self, py: Python<'_>, ev_id: &str, at: i64) -> PyResult<String> {
        let mut failed: Option<PyErr> = None;
        let pid = derive_profile_id_where(ev_id, at, |pid| match self.get_profile(py, pid) {
            Ok(p) => p.is_none(),
            Err(e) => {
                failed = Some(e);
                true
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(pid),
        }
    }

    fn refresh_apart(&mut self, py: Python<'_>, p: &P) -> PyResult<()> {
        let apart = p.borrow().apart.clone();
        if apart.is_empty() {
            return Ok(());
        }
        let mut live: Vec<String> = Vec::new();
        for pid in &apart {
            if let Some(q) = self.live(py, pid)? {
                let q = q.borrow();
                if q.is_active() && !live.contains(&q.id) {
                    live.push(q.id.clone());
                }
            }
        }
        if live != apart {
            p.borrow_mut().apart = live;
            self.touch(p);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        py: Python<'_>,
        changes: &mut Vec<Change>,
        a: P,
        b: P,
        ev_id: &str,
        at: i64,
        bridge_a: Vec<String>,
        bridge_b: Vec<String>,
    ) -> PyResult<P> {
        if Rc::ptr_eq(&a, &b) {
            // only a corrupt state gets here (two index owners whose rows hold one profile)
            return Err(py_err(format!(
                "corrupt state: profile {} would merge with itself",
                a.borrow().id
            )));
        }
        let (a, b, bridge_a, bridge_b) = if b.borrow().id < a.borrow().id {
            (b, a, bridge_b, bridge_a)
        } else {
            (a, b, bridge_a, bridge_b)
        };
        let moved = b.borrow().sorted_keys();
        {
            let bq = b.borrow();
            let mut aq = a.borrow_mut();
            self.absorb(py, &mut aq, &bq)?;
        }
        let aid = a.borrow().id.clone();
        for key in &moved {
            self.set_owner(key, &aid);
        }
        let bid = {
            let mut bq = b.borrow_mut();
            bq.status = MERGED.to_owned();
            bq.merged_into = Some(aid.clone());
            bq.ids.clear();
            bq.types.clear();
            bq.id.clone()
        };
        self.touch(&b);
        self.inc("merges", 1)?;
        self.inc("profiles_live", -1)?;
        self.emit(
            changes,
            &a,
            Kind::Merged,
            ev_id,
            at,
            Payload::Merged {
                merged: bid,
                moved,
                bridge: bridge_a,
                bridge_other: bridge_b,
            },
        );
        Ok(a)
    }

    fn corroborated(side_a: &[Ident], side_b: &[Ident], prior: &HashMap<String, Vec<i64>>) -> bool {
        if prior.is_empty() {
            return false;
        }
        for (xs, ys) in [(side_a, side_b), (side_b, side_a)] {
            for x in xs {
                if let Some(nb) = prior.get(&x.key) {
                    if !nb.is_empty() && ys.iter().any(|y| nb.contains(&neighbour_code(&y.key))) {
                        return true;
                    }
                }
            }
        }
        false
    }

    fn link_slow(
        &mut self,
        py: Python<'_>,
        ev: &Event,
        mut keys: Vec<String>,
        mut idents: Vec<Ident>,
        mut owners: Vec<Option<Pid>>,
    ) -> PyResult<LinkOut> {
        let at = ev.at;
        let ev_id = ev.id;
        let mut changes: Vec<Change> = Vec::new();
        let mut deferred: Vec<Pending> = Vec::new();
        let mut new_nb: HashMap<String, Vec<i64>> = HashMap::default();

        // step "evidence": what each known soft value had been seen with before this event
        let mut seen_with_before: HashMap<String, Vec<i64>> = HashMap::default();
        if self.rules.corroborate_active() && keys.len() > 1 {
            for (key, own) in keys.iter().zip(owners.iter()) {
                if let Some(own) = own {
                    if let Some(op) = self.get_profile(py, own)? {
                        if let Some(Some(nb)) = op.borrow().rec(key).map(|r| r.nb.as_ref()) {
                            if !nb.is_empty() {
                                seen_with_before.insert(key.clone(), nb.clone());
                            }
                        }
                    }
                }
            }
        }

        // step "generic": values seen with too many strong identifiers stop linking, for good
        if self.rules.tracks_neighbours() && keys.len() > 1 {
            let became = self.track_generic(py, &keys, &idents, &owners, &mut new_nb)?;
            if !became.is_empty() {
                for &xi in &became {
                    let key = keys[xi].clone();
                    self.generic.insert(key.clone());
                    let mut gkey = b"g:".to_vec();
                    gkey.extend_from_slice(key.as_bytes());
                    self.writes.push((gkey, Some(b"1".to_vec())));
                    self.inc("generic", 1)?;
                    self.refused("generic_value")?;
                    deferred.push(Pending {
                        rule: "generic_value".into(),
                        detail: "value seen with too many distinct strong identifiers".into(),
                        identifiers: vec![key],
                        other: owners[xi].as_ref().map(|o| o.to_string()),
                    });
                }
                let keep: Vec<bool> = (0..keys.len()).map(|i| !became.contains(&i)).collect();
                let mut i = 0;
                keys.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
                let mut i = 0;
                idents.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
                let mut i = 0;
                owners.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
                if keys.is_empty() {
                    self.flush_deferred(py, &mut changes, deferred, None, ev_id, at)?;
                    return Ok(LinkOut {
                        profile_id: None,
                        changes,
                        anchor: None,
                    });
                }
            }
        }

        // step "anchor": the highest-priority identifier decides the event's profile
        let mut pending: Option<P> = None;
        let mut target: Option<P> = match &owners[0] {
            Some(own) => self.get_profile(py, own)?,
            None => None,
        };
        if !target.as_ref().is_some_and(|t| t.borrow().is_active()) {
            let pid = self.fresh_id(py, ev_id, at)?;
            let mut fresh = Profile::new(pid.clone(), at);
            let rec = self.record(&idents[0], ev, &pid, new_nb.get(&keys[0]));
            fresh.add_identifier(keys[0].clone(), rec);
            let fresh = Rc::new(RefCell::new(fresh));
            pending = Some(fresh.clone());
            target = Some(fresh);
        }
        let mut target: P = target.expect("a target exists by now");
        let mut side_t: Vec<Ident> = vec![idents[0].clone()];
        let mut handled: HashMap<Pid, Option<usize>> = HashMap::default();

        // step "link": each further identifier in priority order joins, merges or is refused
        for idx in 1..keys.len() {
            let key = &keys[idx];
            let ident = &idents[idx];
            let own = self.owner(py, key)?;
            if let Some(pp) = &pending {
                if pp.borrow().holds(key) {
                    continue;
                }
            }
            if own.as_deref() == Some(target.borrow().id.as_str()) {
                side_t.push(ident.clone());
                continue;
            }
            let Some(own) = own else {
                let refusal = self.rules.check_attach(&target.borrow(), ident, at);
                if let Some(r) = refusal {
                    self.refused(&r.rule)?;
                    deferred.push(Pending {
                        rule: r.rule,
                        detail: r.detail,
                        identifiers: vec![key.clone()],
                        other: None,
                    });
                    continue;
                }
                let tid = target.borrow().id.clone();
                let rec = self.record(ident, ev, &tid, new_nb.get(key));
                target.borrow_mut().add_identifier(key.clone(), rec);
                if pending.is_none() {
                    // a new profile registers its identifiers when it is created
                    self.set_owner(key, &tid);
                    let bridge = side_t.iter().map(|i| i.key.clone()).collect();
                    self.emit(
                        &mut changes,
                        &target,
                        Kind::Attached,
                        ev_id,
                        at,
                        Payload::Attached {
                            identifier: key.clone(),
                            bridge,
                        },
                    );
                }
                side_t.push(ident.clone());
                continue;
            };
            if let Some(prior) = handled.get(&own) {
                if let Some(i) = prior {
                    deferred[*i].identifiers.push(key.clone());
                }
                continue;
            }
            let other = match self.get_profile(py, &own)? {
                Some(o) if o.borrow().is_active() => o,
                _ => continue,
            };
            let mut side_o: Vec<Ident> = Vec::new();
            for j in idx..keys.len() {
                if self.owner(py, &keys[j])?.as_ref() == Some(&own) {
                    side_o.push(idents[j].clone());
                }
            }
            self.refresh_apart(py, &target)?;
            self.refresh_apart(py, &other)?;
            let corroborated =
                pending.is_some() || Self::corroborated(&side_t, &side_o, &seen_with_before);
            let refusal = self.rules.check_merge(
                &target.borrow(),
                &other.borrow(),
                &side_t,
                &side_o,
                at,
                corroborated,
            );
            if let Some(r) = refusal {
                self.refused(&r.rule)?;
                handled.insert(own.clone(), Some(deferred.len()));
                deferred.push(Pending {
                    rule: r.rule,
                    detail: r.detail,
                    identifiers: vec![key.clone()],
                    other: Some(other.borrow().id.clone()),
                });
                continue;
            }
            handled.insert(own.clone(), None);
            let bridge_t: Vec<String> = side_t.iter().map(|i| i.key.clone()).collect();
            let bridge_o: Vec<String> = side_o.iter().map(|i| i.key.clone()).collect();
            if let Some(pp) = pending.take() {
                // the event's new identifiers join an existing profile: no profile is created
                let oid = other.borrow().id.clone();
                let moved: Vec<(String, Rec)> = pp.borrow().ids.clone();
                for (pkey, mut prec) in moved {
                    prec.origin = oid.clone();
                    other.borrow_mut().add_identifier(pkey.clone(), prec);
                    self.set_owner(&pkey, &oid);
                    self.emit(
                        &mut changes,
                        &other,
                        Kind::Attached,
                        ev_id,
                        at,
                        Payload::Attached {
                            identifier: pkey,
                            bridge: bridge_o.clone(),
                        },
                    );
                }
                target = other;
            } else {
                target = self.merge(
                    py,
                    &mut changes,
                    target,
                    other,
                    ev_id,
                    at,
                    bridge_t,
                    bridge_o,
                )?;
            }
            side_t.extend(side_o);
        }

        if let Some(pp) = pending {
            // step "create": nothing known joined, the event starts a profile
            target = pp;
            let (tid, tkeys) = {
                let t = target.borrow();
                (
                    t.id.clone(),
                    t.ids.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
                )
            };
            self.p_young.insert(tid.clone(), target.clone());
            for key in &tkeys {
                self.set_owner(key, &tid);
            }
            self.inc("profiles_created", 1)?;
            self.inc("profiles_live", 1)?;
            let identifiers = target.borrow().sorted_keys();
            self.emit(
                &mut changes,
                &target,
                Kind::Created,
                ev_id,
                at,
                Payload::Created {
                    identifiers,
                    anchor: keys[0].clone(),
                },
            );
        }

        // step "touch": identifiers of the event now in the target get last seen / verified
        {
            let mut t = target.borrow_mut();
            for (key, ident) in keys.iter().zip(idents.iter()) {
                if let Some(rec) = t.rec_mut(key) {
                    if at > rec.last {
                        rec.last = at;
                    }
                    if ident.verified && !rec.verified {
                        rec.verified = true;
                        rec.verified_as = None;
                    }
                }
            }
            self.record_event(py, &mut t, ev)?;
        }
        self.touch(&target);
        if self.rules.shared_active() && keys.len() > 1 {
            self.track_shared(py, &keys, &idents, &target, &mut deferred)?;
        }
        let tid = target.borrow().id.clone();
        self.flush_deferred(py, &mut changes, deferred, Some(target), ev_id, at)?;
        Ok(LinkOut {
            profile_id: Some(tid),
            changes,
            anchor: Some(keys[0].clone()),
        })
    }

    fn track_shared(
        &mut self,
        py: Python<'_>,
        keys: &[String],
        idents: &[Ident],
        target: &P,
        deferred: &mut Vec<Pending>,
    ) -> PyResult<()> {
        let tid = target.borrow().id.clone();
        let mut person_here = false;
        for (k, i) in keys.iter().zip(idents.iter()) {
            if contains(&self.rules.shared_person_types, i.typ())
                && self.owner(py, k)?.as_deref() == Some(tid.as_str())
            {
                person_here = true;
                break;
            }
        }
        if !person_here {
            return Ok(());
        }
        let code = people_code(&tid);
        for (key, ident) in keys.iter().zip(idents.iter()) {
            if !contains(&self.rules.shared_types, ident.typ()) || self.generic.contains(key) {
                continue;
            }
            let Some(own) = self.owner(py, key)? else {
                continue;
            };
            if *own == *tid {
                continue;
            }
            let Some(other) = self.get_profile(py, &own)? else {
                continue;
            };
            let (people, added, oid) = {
                let mut o = other.borrow_mut();
                if !o.is_active() || !o.has_type_in(&self.rules.shared_person_types) {
                    continue;
                }
                let oid = o.id.clone();
                let Some(rec) = o.rec_mut(key) else { continue };
                let nb = rec.nb.get_or_insert_with(Vec::new);
                let added = !nb.contains(&code);
                if added {
                    nb.push(code);
                }
                (1 + count_people(nb), added, oid)
            };
            if added {
                self.touch(&other);
            }
            if people as i64 > self.rules.shared_max_people {
                self.generic.insert(key.clone());
                let mut gkey = b"g:".to_vec();
                gkey.extend_from_slice(key.as_bytes());
                self.writes.push((gkey, Some(b"s".to_vec())));
                self.inc("shared", 1)?;
                self.refused("shared_device")?;
                deferred.push(Pending {
                    rule: "shared_device".into(),
                    detail: format!("weak value seen with person identifiers of {people} profiles"),
                    identifiers: vec![key.clone()],
                    other: Some(oid),
                });
            }
        }
        Ok(())
    }

    fn flush_deferred(
        &mut self,
        py: Python<'_>,
        changes: &mut Vec<Change>,
        deferred: Vec<Pending>,
        target: Option<P>,
        ev_id: &str,
        at: i64,
    ) -> PyResult<()> {
        for d in deferred {
            let mut holder = target.clone();
            if holder.is_none() {
                if let Some(other) = &d.other {
                    holder = self.live(py, other)?;
                }
            }
            let Some(holder) = holder else { continue };
            if !holder.borrow().is_active() {
                continue;
            }
            let mut identifiers = d.identifiers;
            identifiers.sort();
            self.emit(
                changes,
                &holder,
                Kind::Refused,
                ev_id,
                at,
                Payload::Refused {
                    rule: d.rule,
                    detail: d.detail,
                    identifiers,
                    other: d.other,
                },
            );
        }
        Ok(())
    }
}
