//! Profile state as `streams/core/state.py` keeps it, and its stored encoding byte for byte.

use serde_json::Value;

use crate::cache::{put_uint, Symbols};

pub const ACTIVE: &str = "active";
pub const MERGED: &str = "merged";

/// Event types whose `total` counts as an order and revenue (`ORDER_TYPES`).
pub const ORDER_TYPES: [&str; 2] = ["order_placed", "store_purchase"];

/// One identifier record: `[type, first, last, source, verified, via, origin, neighbours | null]`.
#[derive(Clone, Debug)]
pub struct Rec {
    pub typ: String,
    pub first: i64,
    pub last: i64,
    pub source: String,
    pub verified: bool,
    /// a flag stored as an integer (0 / 1, by another tool): Python keeps it as read until it sets True
    pub verified_as: Option<i64>,
    pub via: String,
    pub origin: String,
    pub nb: Option<Vec<i64>>,
}

/// One profile; vectors keep Python's dict insertion order, which the encoding preserves.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub id: String,
    pub status: String,
    pub merged_into: Option<String>,
    pub seq: i64,
    pub created: i64,
    pub first: i64,
    pub last: i64,
    pub events: i64,
    pub orders: i64,
    /// currency → `str(Decimal)`: sums are done by Python's decimal module, stored strings read through it
    pub revenue: Vec<(String, String)>,
    pub channels: Vec<(String, i64, i64)>,
    pub sources: Vec<(String, i64, i64)>,
    pub ids: Vec<(String, Rec)>,
    pub types: Vec<(String, i64)>,
    pub apart: Vec<String>,
    pub merged_from: Vec<String>,
    pub split_from: Option<String>,
    pub extra: Vec<(String, Value)>,
}

pub fn bump(slots: &mut Vec<(String, i64, i64)>, name: &str, count: i64, at: i64) {
    for slot in slots.iter_mut() {
        if slot.0 == name {
            slot.1 += count;
            if at > slot.2 {
                slot.2 = at;
            }
            return;
        }
    }
    slots.push((name.to_owned(), count, at));
}

impl Profile {
    pub fn new(id: String, created: i64) -> Self {
        Profile {
            id,
            status: ACTIVE.to_owned(),
            created,
            first: created,
            last: created,
            ..Default::default()
        }
    }

    pub fn is_active(&self) -> bool {
        self.status == ACTIVE
    }

    pub fn rec(&self, key: &str) -> Option<&Rec> {
        self.ids.iter().find(|(k, _)| k == key).map(|(_, r)| r)
    }

    pub fn rec_mut(&mut self, key: &str) -> Option<&mut Rec> {
        self.ids.iter_mut().find(|(k, _)| k == key).map(|(_, r)| r)
    }

    pub fn holds(&self, key: &str) -> bool {
        self.ids.iter().any(|(k, _)| k == key)
    }

    pub fn type_count(&self, t: &str) -> i64 {
        self.types
            .iter()
            .find(|(k, _)| k == t)
            .map_or(0, |(_, n)| *n)
    }

    /// `count_type`: distinct identifiers of a type, or only those seen since `since`.
    pub fn count_type(&self, t: &str, since: Option<i64>) -> i64 {
        match since {
            None => self.type_count(t),
            Some(s) => self
                .ids
                .iter()
                .filter(|(_, r)| r.typ == t && r.last >= s)
                .count() as i64,
        }
    }

    pub fn has_type_in(&self, types: &[String]) -> bool {
        self.types.iter().any(|(t, _)| types.iter().any(|x| x == t))
    }

    pub fn add_identifier(&mut self, key: String, rec: Rec) {
        let t = rec.typ.clone();
        match self.ids.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = rec,
            None => self.ids.push((key, rec)),
        }
        match self.types.iter_mut().find(|(k, _)| *k == t) {
            Some(slot) => slot.1 += 1,
            None => self.types.push((t, 1)),
        }
    }

    pub fn sorted_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.ids.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys
    }

    fn rebuild_types(&mut self) {
        let mut types: Vec<(String, i64)> = Vec::new();
        for (_, r) in &self.ids {
            match types.iter_mut().find(|(t, _)| *t == r.typ) {
                Some(slot) => slot.1 += 1,
                None => types.push((r.typ.clone(), 1)),
            }
        }
        self.types = types;
    }

    // --- encoding (`ProfileState.encode`) -------------------------------------------------------

    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(128 + 160 * self.ids.len());
        if !self.is_active() {
            o.extend_from_slice(b"[0,");
            put_str(&mut o, &self.id);
            o.push(b',');
            put_str(&mut o, &self.status);
            o.push(b',');
            put_opt_str(&mut o, self.merged_into.as_deref());
            o.push(b',');
            put_int(&mut o, self.seq);
            o.push(b']');
            return o;
        }
        o.extend_from_slice(b"[1,");
        put_str(&mut o, &self.id);
        for n in [
            self.seq,
            self.created,
            self.first,
            self.last,
            self.events,
            self.orders,
        ] {
            o.push(b',');
            put_int(&mut o, n);
        }
        o.push(b',');
        if self.revenue.is_empty() {
            o.extend_from_slice(b"null");
        } else {
            o.push(b'{');
            for (i, (cur, amount)) in self.revenue.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                put_str(&mut o, cur);
                o.push(b':');
                put_str(&mut o, amount);
            }
            o.push(b'}');
        }
        for slots in [&self.channels, &self.sources] {
            o.extend_from_slice(b",{");
            for (i, (name, count, at)) in slots.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                put_str(&mut o, name);
                o.extend_from_slice(b":[");
                put_int(&mut o, *count);
                o.push(b',');
                put_int(&mut o, *at);
                o.push(b']');
            }
            o.push(b'}');
        }
        o.extend_from_slice(b",{");
        for (i, (key, r)) in self.ids.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            put_str(&mut o, key);
            o.extend_from_slice(b":[");
            put_str(&mut o, &r.typ);
            o.push(b',');
            put_int(&mut o, r.first);
            o.push(b',');
            put_int(&mut o, r.last);
            o.push(b',');
            put_str(&mut o, &r.source);
            match r.verified_as {
                Some(n) => {
                    o.push(b',');
                    put_int(&mut o, n);
                    o.push(b',');
                }
                None => o.extend_from_slice(if r.verified { b",true," } else { b",false," }),
            }
            put_str(&mut o, &r.via);
            o.push(b',');
            put_str(&mut o, &r.origin);
            o.push(b',');
            match &r.nb {
                None => o.extend_from_slice(b"null"),
                Some(codes) => put_ints(&mut o, codes),
            }
            o.push(b']');
        }
        o.extend_from_slice(b"},");
        put_strs(&mut o, &self.apart);
        o.push(b',');
        put_strs(&mut o, &self.merged_from);
        o.push(b',');
        put_opt_str(&mut o, self.split_from.as_deref());
        o.push(b',');
        if self.extra.is_empty() {
            o.extend_from_slice(b"null");
        } else {
            o.push(b'{');
            for (i, (k, v)) in self.extra.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                put_str(&mut o, k);
                o.push(b':');
                serde_json::to_writer(&mut o, v).expect("JSON values serialise");
            }
            o.push(b'}');
        }
        o.push(b']');
        o
    }

    // --- decoding (`ProfileState.decode`, both the positional and the older dict form) -----------

    pub fn decode(raw: &[u8]) -> Result<Profile, String> {
        let v: Value =
            serde_json::from_slice(raw).map_err(|e| format!("profile is not JSON: {e}"))?;
        match v {
            Value::Object(d) => Self::from_dict(&d),
            Value::Array(a) => Self::from_array(&a),
            _ => Err("profile is neither an array nor an object".into()),
        }
    }

    fn from_array(a: &[Value]) -> Result<Profile, String> {
        let tag = a
            .first()
            .and_then(Value::as_i64)
            .ok_or("profile array without its tag")?;
        if tag == 0 {
            if a.len() != 5 {
                return Err("tombstone of unexpected length".into());
            }
            return Ok(Profile {
                id: as_string(&a[1])?,
                status: as_string(&a[2])?,
                merged_into: as_opt_string(&a[3])?,
                seq: as_int(&a[4])?,
                ..Default::default()
            });
        }
        if a.len() != 16 {
            return Err("profile array of unexpected length".into());
        }
        let mut p = Profile {
            id: as_string(&a[1])?,
            status: ACTIVE.to_owned(),
            seq: as_int(&a[2])?,
            created: as_int(&a[3])?,
            first: as_int(&a[4])?,
            last: as_int(&a[5])?,
            events: as_int(&a[6])?,
            orders: as_int(&a[7])?,
            revenue: revenue_of(&a[8])?,
            channels: slots_of(&a[9])?,
            sources: slots_of(&a[10])?,
            ids: ids_of(&a[11])?,
            apart: opt_strs(&a[12])?,
            merged_from: opt_strs(&a[13])?,
            split_from: as_opt_string(&a[14])?,
            extra: extra_of(&a[15])?,
            ..Default::default()
        };
        p.rebuild_types();
        Ok(p)
    }

    fn from_dict(d: &serde_json::Map<String, Value>) -> Result<Profile, String> {
        let get = |k: &str| d.get(k).ok_or_else(|| format!("profile dict without {k}"));
        let mut p = Profile {
            id: as_string(get("id")?)?,
            status: as_string(get("st")?)?,
            seq: as_int(get("seq")?)?,
            created: d.get("c").map_or(Ok(0), as_int)?,
            ..Default::default()
        };
        p.first = p.created;
        p.last = p.created;
        if !p.is_active() {
            p.merged_into = d.get("into").map_or(Ok(None), as_opt_string)?;
            return Ok(p);
        }
        p.first = as_int(get("f")?)?;
        p.last = as_int(get("l")?)?;
        p.events = as_int(get("ev")?)?;
        p.orders = as_int(get("o")?)?;
        p.revenue = revenue_of(get("rev")?)?;
        p.channels = slots_of(get("ch")?)?;
        p.sources = slots_of(get("src")?)?;
        p.ids = ids_of(get("ids")?)?;
        p.apart = opt_strs(get("ap")?)?;
        p.merged_from = opt_strs(get("mf")?)?;
        p.split_from = as_opt_string(get("sf")?)?;
        p.extra = extra_of(get("x")?)?;
        p.rebuild_types();
        Ok(p)
    }
}

fn as_int(v: &Value) -> Result<i64, String> {
    v.as_i64()
        .ok_or_else(|| format!("expected an integer, found {v}"))
}

fn as_string(v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, found {v}"))
}

fn as_opt_string(v: &Value) -> Result<Option<String>, String> {
    if v.is_null() {
        Ok(None)
    } else {
        as_string(v).map(Some)
    }
}

fn opt_strs(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a.iter().map(as_string).collect(),
        _ => Err(format!("expected a list of strings, found {v}")),
    }
}

fn revenue_of(v: &Value) -> Result<Vec<(String, String)>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, x)| Ok((k.clone(), as_string(x)?)))
            .collect(),
        _ => Err(format!("expected revenue, found {v}")),
    }
}

fn slots_of(v: &Value) -> Result<Vec<(String, i64, i64)>, String> {
    let m = v
        .as_object()
        .ok_or_else(|| format!("expected counters, found {v}"))?;
    m.iter()
        .map(|(k, x)| match x.as_array().map(Vec::as_slice) {
            Some([count, at]) => Ok((k.clone(), as_int(count)?, as_int(at)?)),
            _ => Err(format!("expected [count, last], found {x}")),
        })
        .collect()
}

fn ids_of(v: &Value) -> Result<Vec<(String, Rec)>, String> {
    let m = v
        .as_object()
        .ok_or_else(|| format!("expected identifiers, found {v}"))?;
    m.iter()
        .map(|(k, x)| {
            let r = x
                .as_array()
                .filter(|r| r.len() == 8)
                .ok_or_else(|| format!("bad identifier record {x}"))?;
            let nb = match &r[7] {
                Value::Null => None,
                Value::Array(codes) => Some(
                    codes
                        .iter()
                        .map(as_int)
                        .collect::<Result<Vec<i64>, String>>()?,
                ),
                other => return Err(format!("bad neighbour list {other}")),
            };
            let verified_as = r[4].as_i64();
            let verified = match verified_as {
                Some(n) => n != 0,
                None => r[4]
                    .as_bool()
                    .ok_or_else(|| format!("bad verified flag {}", r[4]))?,
            };
            Ok((
                k.clone(),
                Rec {
                    typ: as_string(&r[0])?,
                    first: as_int(&r[1])?,
                    last: as_int(&r[2])?,
                    source: as_string(&r[3])?,
                    verified,
                    verified_as,
                    via: as_string(&r[5])?,
                    origin: as_string(&r[6])?,
                    nb,
                },
            ))
        })
        .collect()
}

fn extra_of(v: &Value) -> Result<Vec<(String, Value)>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => Ok(m.iter().map(|(k, x)| (k.clone(), x.clone())).collect()),
        _ => Err(format!("expected extra fields, found {v}")),
    }
}

// --- JSON output as orjson writes it (compact; serde_json escapes strings the same way) -------------

pub fn put_str(o: &mut Vec<u8>, s: &str) {
    // nearly every string (ids, keys, names) needs no escape: copied as is; serde_json escapes the rest as
    // orjson does (\", \\, \n-style short forms, \u00xx for other control characters)
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        o.reserve(s.len() + 2);
        o.push(b'"');
        o.extend_from_slice(s.as_bytes());
        o.push(b'"');
    } else {
        serde_json::to_writer(&mut *o, s).expect("strings serialise");
    }
}

pub fn put_opt_str(o: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => o.extend_from_slice(b"null"),
        Some(s) => put_str(o, s),
    }
}

pub fn put_int(o: &mut Vec<u8>, n: i64) {
    o.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

pub fn put_ints(o: &mut Vec<u8>, ns: &[i64]) {
    o.push(b'[');
    for (i, n) in ns.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        put_int(o, *n);
    }
    o.push(b']');
}

pub fn put_strs(o: &mut Vec<u8>, ss: &[String]) {
    o.push(b'[');
    for (i, s) in ss.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        put_str(o, s);
    }
    o.push(b']');
}

// --- the packed form: varints, symbols and length-prefixed strings, ~160 bytes a profile ---------------
//
// The cold cache keeps profiles packed with the graph's symbols; the store keeps them packed without
// (`to_row`: each name as its text, so a row reads back with no table), after a format byte.

/// First byte of a stored profile row in the packed form. Rows of 0.4.4 and older are JSON (`[` or `{`).
pub const ROW_FORMAT: u8 = 1;

struct Packer<'a> {
    out: Vec<u8>,
    syms: Option<&'a mut Symbols>,
}

impl Packer<'_> {
    fn uint(&mut self, n: u64) {
        put_uint(&mut self.out, n);
    }

    fn int(&mut self, n: i64) {
        self.uint(((n << 1) ^ (n >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A recurring name: its symbol + 1, or 0 and the text (no table, the table is full, or the name is long).
    fn sym(&mut self, s: &str) {
        match self.syms.as_deref_mut().and_then(|syms| syms.code(s)) {
            Some(c) => self.uint(u64::from(c) + 1),
            None => {
                self.uint(0);
                self.str(s);
            }
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.uint(0),
            Some(s) => {
                self.uint(s.len() as u64 + 1);
                self.out.extend_from_slice(s.as_bytes());
            }
        }
    }

    fn strs(&mut self, ss: &[String]) {
        self.uint(ss.len() as u64);
        for s in ss {
            self.str(s);
        }
    }

    fn slots(&mut self, slots: &[(String, i64, i64)], base: i64) {
        self.uint(slots.len() as u64);
        for (name, count, at) in slots {
            self.sym(name);
            self.int(*count);
            self.int(at.wrapping_sub(base));
        }
    }
}

/// Reads what `Packer` wrote; every read is checked, since a stored row comes from disk.
struct Unpacker<'a> {
    raw: &'a [u8],
    at: usize,
    syms: Option<&'a Symbols>,
}

type Read<T> = Result<T, String>;

impl Unpacker<'_> {
    fn uint(&mut self) -> Read<u64> {
        let (mut n, mut shift) = (0u64, 0u32);
        loop {
            let b = *self.raw.get(self.at).ok_or("packed profile cut short")?;
            self.at += 1;
            if shift == 63 && b > 1 {
                // a tenth byte may hold one bit of 64
                return Err("packed profile: varint too long".into());
            }
            n |= u64::from(b & 0x7F) << shift;
            if b < 0x80 {
                return Ok(n);
            }
            shift += 7;
        }
    }

    fn int(&mut self) -> Read<i64> {
        let n = self.uint()?;
        Ok(((n >> 1) as i64) ^ -((n & 1) as i64))
    }

    fn len(&mut self) -> Read<usize> {
        usize::try_from(self.uint()?).map_err(|e| e.to_string())
    }

    fn bytes(&mut self, len: usize) -> Read<&[u8]> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.raw.len());
        let end = end.ok_or("packed profile cut short")?;
        let out = &self.raw[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn text(&mut self, len: usize) -> Read<String> {
        let bytes = self.bytes(len)?.to_vec();
        String::from_utf8(bytes).map_err(|e| format!("packed profile: {e}"))
    }

    fn str(&mut self) -> Read<String> {
        let len = self.len()?;
        self.text(len)
    }

    fn sym(&mut self) -> Read<String> {
        match self.uint()? {
            0 => self.str(),
            c => {
                let syms = self
                    .syms
                    .ok_or("packed profile: a symbol in a stored row")?;
                let code = u32::try_from(c - 1).map_err(|e| e.to_string())?;
                if code as usize >= syms.len() {
                    return Err("packed profile: unknown symbol".into());
                }
                Ok(syms.name(code).to_owned())
            }
        }
    }

    fn opt_str(&mut self) -> Read<Option<String>> {
        match self.len()? {
            0 => Ok(None),
            n => self.text(n - 1).map(Some),
        }
    }

    fn strs(&mut self) -> Read<Vec<String>> {
        let n = self.len()?;
        (0..n).map(|_| self.str()).collect()
    }

    fn slots(&mut self, base: i64) -> Read<Vec<(String, i64, i64)>> {
        let n = self.len()?;
        (0..n)
            .map(|_| Ok((self.sym()?, self.int()?, base.wrapping_add(self.int()?))))
            .collect()
    }
}

/// A packed record's flags: its boolean fields, and what it leaves out because its key or profile says it.
const TYPE_IN_KEY: u8 = 1;
const ORIGIN_IS_PROFILE: u8 = 2;
const VERIFIED: u8 = 4;
const VERIFIED_AS_INT: u8 = 8;
const HAS_NEIGHBOURS: u8 = 16;

impl Profile {
    /// Compact bytes for the graph's cold cache. The profile id comes first (the cache's key). Recurring
    /// names are symbols, times are deltas from the profile's creation, and a record's type and origin are
    /// left out when its key and profile already say them.
    pub fn pack(&self, syms: &mut Symbols) -> Vec<u8> {
        let mut w = Packer {
            out: Vec::with_capacity(64 + 48 * self.ids.len()),
            syms: Some(syms),
        };
        self.pack_into(&mut w);
        w.out
    }

    /// The stored row (`ProfileState.encode`): `ROW_FORMAT`, then the packed form with every name as text.
    pub fn to_row(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + 56 * self.ids.len());
        out.push(ROW_FORMAT);
        let mut w = Packer { out, syms: None };
        self.pack_into(&mut w);
        w.out
    }

    fn pack_into(&self, w: &mut Packer<'_>) {
        w.str(&self.id);
        w.sym(&self.status);
        w.int(self.seq);
        if !self.is_active() {
            w.opt_str(self.merged_into.as_deref());
            return;
        }
        let base = self.created;
        w.int(base);
        w.int(self.first.wrapping_sub(base));
        w.int(self.last.wrapping_sub(base));
        w.int(self.events);
        w.int(self.orders);
        w.uint(self.revenue.len() as u64);
        for (cur, amount) in &self.revenue {
            w.sym(cur);
            w.str(amount);
        }
        w.slots(&self.channels, base);
        w.slots(&self.sources, base);
        w.uint(self.ids.len() as u64);
        for (key, r) in &self.ids {
            let mut flags = 0;
            // the key's first ':' ends the type
            let typ = r.typ.as_bytes();
            if key.as_bytes().get(typ.len()) == Some(&b':')
                && key.as_bytes().starts_with(typ)
                && !typ.contains(&b':')
            {
                flags |= TYPE_IN_KEY;
            }
            if r.origin == self.id {
                flags |= ORIGIN_IS_PROFILE;
            }
            if r.verified {
                flags |= VERIFIED;
            }
            if r.verified_as.is_some() {
                flags |= VERIFIED_AS_INT;
            }
            if r.nb.is_some() {
                flags |= HAS_NEIGHBOURS;
            }
            w.out.push(flags);
            w.str(key);
            if flags & TYPE_IN_KEY == 0 {
                w.sym(&r.typ);
            }
            w.int(r.first.wrapping_sub(base));
            w.int(r.last.wrapping_sub(r.first));
            w.sym(&r.source);
            if let Some(n) = r.verified_as {
                w.int(n);
            }
            w.str(&r.via);
            if flags & ORIGIN_IS_PROFILE == 0 {
                w.str(&r.origin);
            }
            if let Some(codes) = &r.nb {
                w.uint(codes.len() as u64);
                for c in codes {
                    w.int(*c);
                }
            }
        }
        w.strs(&self.apart);
        w.strs(&self.merged_from);
        w.opt_str(self.split_from.as_deref());
        if self.extra.is_empty() {
            w.opt_str(None);
        } else {
            let extra: serde_json::Map<String, Value> = self.extra.iter().cloned().collect();
            w.opt_str(Some(
                &serde_json::to_string(&extra).expect("JSON values serialise"),
            ));
        }
    }

    /// Inverse of `pack`, with the same symbols.
    pub fn unpack(raw: &[u8], syms: &Symbols) -> Profile {
        let mut r = Unpacker {
            raw,
            at: 0,
            syms: Some(syms),
        };
        Self::unpack_from(&mut r).expect("packed by `pack`")
    }

    /// A stored row: `to_row`'s form, or the JSON of 0.4.4 and older (`decode`).
    pub fn from_stored(raw: &[u8]) -> Result<Profile, String> {
        match raw.split_first() {
            Some((&ROW_FORMAT, packed)) => {
                let mut r = Unpacker {
                    raw: packed,
                    at: 0,
                    syms: None,
                };
                let p = Self::unpack_from(&mut r)?;
                if r.at != packed.len() {
                    return Err("packed profile row: bytes after its end".into());
                }
                Ok(p)
            }
            _ => Self::decode(raw),
        }
    }

    fn unpack_from(r: &mut Unpacker<'_>) -> Read<Profile> {
        let mut p = Profile {
            id: r.str()?,
            status: r.sym()?,
            seq: r.int()?,
            ..Default::default()
        };
        if !p.is_active() {
            p.merged_into = r.opt_str()?;
            return Ok(p);
        }
        let base = r.int()?;
        p.created = base;
        p.first = base.wrapping_add(r.int()?);
        p.last = base.wrapping_add(r.int()?);
        p.events = r.int()?;
        p.orders = r.int()?;
        let n = r.len()?;
        p.revenue = (0..n)
            .map(|_| Ok((r.sym()?, r.str()?)))
            .collect::<Read<_>>()?;
        p.channels = r.slots(base)?;
        p.sources = r.slots(base)?;
        let n = r.len()?;
        let mut ids = Vec::with_capacity(n.min(r.raw.len()));
        for _ in 0..n {
            let flags = r.bytes(1)?[0];
            if flags >= 0x80 {
                return Err("packed profile: bad record flags".into());
            }
            let key = r.str()?;
            let typ = if flags & TYPE_IN_KEY != 0 {
                let end = key
                    .find(':')
                    .ok_or("packed profile: a key without its type")?;
                key[..end].to_owned()
            } else {
                r.sym()?
            };
            let first = base.wrapping_add(r.int()?);
            let last = first.wrapping_add(r.int()?);
            let source = r.sym()?;
            let verified_as = if flags & VERIFIED_AS_INT != 0 {
                Some(r.int()?)
            } else {
                None
            };
            let via = r.str()?;
            let origin = if flags & ORIGIN_IS_PROFILE != 0 {
                p.id.clone()
            } else {
                r.str()?
            };
            let nb = if flags & HAS_NEIGHBOURS != 0 {
                let n = r.len()?;
                Some((0..n).map(|_| r.int()).collect::<Read<Vec<i64>>>()?)
            } else {
                None
            };
            let rec = Rec {
                typ,
                first,
                last,
                source,
                verified: flags & VERIFIED != 0,
                verified_as,
                via,
                origin,
                nb,
            };
            ids.push((key, rec));
        }
        p.ids = ids;
        p.apart = r.strs()?;
        p.merged_from = r.strs()?;
        p.split_from = r.opt_str()?;
        p.extra = match r.opt_str()? {
            None => Vec::new(),
            Some(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => m.into_iter().collect(),
                Ok(_) => return Err("packed profile: extra fields are not a JSON object".into()),
                Err(e) => return Err(format!("packed profile: extra fields: {e}")),
            },
        };
        p.rebuild_types();
        Ok(p)
    }
}
