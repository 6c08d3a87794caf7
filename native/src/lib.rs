//! `omnistitch_native`: the stitching core's link path in Rust, for `streams.core.native.NativeGraph`.
//!
//! It reads and writes the same store keys and bytes as `streams.core.graph.IdentityGraph`, so the two can
//! take turns on one state: the Python graph keeps everything but `link` (erase events, split, explain).

// pyo3 0.22's #[pymethods] expansion trips this newer clippy lint on every method returning PyResult
#![allow(clippy::useless_conversion)]

/// mimalloc: the graph frees and allocates tens of thousands of small blocks per cache rotation, and glibc's
/// malloc spent a fifth of the link time consolidating its free lists (perf, 800k events)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cache;
mod graph;
mod ids;
mod rules;
mod state;

use rustc_hash::FxHashMap as HashMap;

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};

use graph::{Change, Event, Field, Graph, Kind};
use rules::{Ident, Rules};
use state::ORDER_TYPES;

fn str_set(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let mut v: Vec<String> = Vec::new();
    for item in obj.iter()? {
        v.push(item?.extract()?);
    }
    v.sort();
    Ok(v)
}

fn rules_of(r: &Bound<'_, PyAny>) -> PyResult<Rules> {
    let priority: Vec<String> = r.getattr("priority")?.extract()?;
    let rank: HashMap<String, usize> = priority
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i))
        .collect();
    let mut limits = HashMap::default();
    for (t, limit) in r
        .getattr("limits")?
        .call_method0("items")?
        .iter()?
        .map(|i| i.and_then(|i| i.extract::<(String, Bound<'_, PyAny>)>()))
        .collect::<PyResult<Vec<_>>>()?
    {
        let max: i64 = limit.getattr("max")?.extract()?;
        let window: Option<i64> = limit.getattr("window_ms")?.extract()?;
        limits.insert(t, (max, window));
    }
    let generic_max: HashMap<String, i64> = r
        .getattr("generic_max")?
        .call_method0("items")?
        .iter()?
        .map(|i| i.and_then(|i| i.extract::<(String, i64)>()))
        .collect::<PyResult<HashMap<_, _>>>()?;
    Ok(Rules {
        unranked: rank.len(),
        rank,
        protection: r.getattr("protection")?.is_truthy()?,
        strong: str_set(&r.getattr("strong_types")?)?,
        unique: str_set(&r.getattr("unique_types")?)?,
        weak_cannot_bridge: r.getattr("weak_cannot_bridge")?.is_truthy()?,
        verified_beats_unverified: r.getattr("verified_beats_unverified")?.is_truthy()?,
        max_identifiers: r.getattr("max_identifiers")?.extract()?,
        corroborate_soft_bridges: r.getattr("corroborate_soft_bridges")?.is_truthy()?,
        limits,
        generic: r.getattr("generic")?.is_truthy()?,
        generic_types: str_set(&r.getattr("generic_types")?)?,
        generic_max,
        shared_devices: r.getattr("shared_devices")?.is_truthy()?,
        shared_types: str_set(&r.getattr("shared_types")?)?,
        shared_person_types: str_set(&r.getattr("shared_person_types")?)?,
        shared_max_people: r.getattr("shared_max_people")?.extract()?,
    })
}

/// The native graph; `streams.core.native.NativeGraph` owns one and hands it its Python collaborators.
#[pyclass(unsendable)]
struct Engine {
    g: Graph,
    link_result: Py<PyAny>,
    new_tuple: Py<PyAny>,
    change: Py<PyAny>,
    /// `object.__new__`: an `IdentityChange` is made empty and filled slot by slot (`set_slot`), as its frozen
    /// dataclass `__init__` does in Python bytecode (about 9,000 instructions a change)
    new_object: Py<PyAny>,
    kinds: [Py<PyAny>; 4],
    no_changes: Py<PyTuple>,
    /// links erase events through the Python graph (a fresh one over the same, flushed store)
    delegate: Py<PyAny>,
    /// a Python graph handed out for queries and operator actions: flushed, then the store re-read, before
    /// the next native link
    lent: Option<Py<PyAny>>,
}

impl Engine {
    /// The event as `Graph::link` reads it; its texts borrow the Python strings, which `held` keeps.
    fn event<'a, 'py>(
        &self,
        py: Python<'py>,
        ev: &Bound<'py, PyAny>,
        typ: &str,
        held: &'a mut Option<[Bound<'py, PyString>; 3]>,
    ) -> PyResult<Event<'a>> {
        let mut idents = Vec::new();
        for item in ev.getattr(pyo3::intern!(py, "identifiers"))?.iter()? {
            let item = item?;
            let typ = item.getattr(pyo3::intern!(py, "type"))?;
            let typ = typ.downcast::<PyString>()?.to_str()?;
            let value = item.getattr(pyo3::intern!(py, "value"))?;
            let value = value.downcast::<PyString>()?.to_str()?;
            // a bool, as validation makes it (the Python graph would store any truthy value as given)
            let verified: bool = item.getattr(pyo3::intern!(py, "verified"))?.extract()?;
            idents.push(Ident::new(typ, value, verified));
        }
        let is_order = ORDER_TYPES.contains(&typ);
        // the order's attributes, read when the event is folded into its profile (as `record_event` does)
        let attributes = if is_order {
            Some(ev.getattr(pyo3::intern!(py, "attributes"))?.unbind())
        } else {
            None
        };
        let text = |name| -> PyResult<Bound<'py, PyString>> {
            Ok(ev.getattr(name)?.downcast_into::<PyString>()?)
        };
        let [id, source, channel] = held.insert([
            text(intern!(py, "event_id"))?,
            text(intern!(py, "source"))?,
            text(intern!(py, "channel"))?,
        ]);
        let at = ev.getattr(pyo3::intern!(py, "occurred_at_ms"))?.extract()?;
        Ok(Event {
            id: id.to_str()?,
            source: source.to_str()?,
            channel: channel.to_str()?,
            at,
            idents,
            is_order,
            attributes,
        })
    }

    fn change_object(&self, py: Python<'_>, c: &Change) -> PyResult<PyObject> {
        let payload = PyDict::new_bound(py);
        for (key, value) in c.payload.fields() {
            match value {
                Field::Str(v) => payload.set_item(key, v)?,
                Field::Strs(v) => payload.set_item(key, PyList::new_bound(py, v))?,
                Field::OptStr(v) => payload.set_item(key, v)?,
            }
        }
        let kind = match c.kind {
            Kind::Created => &self.kinds[0],
            Kind::Attached => &self.kinds[1],
            Kind::Merged => &self.kinds[2],
            Kind::Refused => &self.kinds[3],
        };
        let change = self.new_object.bind(py).call1((self.change.bind(py),))?;
        let slots = [
            (intern!(py, "kind"), kind.clone_ref(py).into_bound(py)),
            (
                intern!(py, "profile_id"),
                c.profile_id.to_object(py).into_bound(py),
            ),
            (intern!(py, "seq"), c.seq.to_object(py).into_bound(py)),
            (
                intern!(py, "event_id"),
                c.event_id.to_object(py).into_bound(py),
            ),
            (intern!(py, "at_ms"), c.at.to_object(py).into_bound(py)),
            (intern!(py, "payload"), payload.into_any()),
        ];
        for (name, value) in &slots {
            set_slot(&change, name, value)?;
        }
        Ok(change.unbind())
    }

    fn take_back(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(graph) = &self.lent {
            graph.bind(py).call_method0("flush")?; // on failure it stays lent, and is flushed again next time
            self.lent = None;
            self.g.load(py)?;
        }
        Ok(())
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (store, rules, link_result, change, kinds, delegate, cache_profiles, cold_profiles, cache_identifiers, flush_every, history))]
    fn new(
        py: Python<'_>,
        store: Py<PyAny>,
        rules: &Bound<'_, PyAny>,
        link_result: Py<PyAny>,
        change: Py<PyAny>,
        kinds: (Py<PyAny>, Py<PyAny>, Py<PyAny>, Py<PyAny>),
        delegate: Py<PyAny>,
        cache_profiles: usize,
        cold_profiles: usize,
        cache_identifiers: usize,
        flush_every: i64,
        history: bool,
    ) -> PyResult<Self> {
        let g = Graph::new(
            py,
            store,
            rules_of(rules)?,
            cache_profiles,
            cold_profiles,
            cache_identifiers,
            flush_every,
            history,
        )?;
        Ok(Engine {
            g,
            link_result,
            new_tuple: py
                .import_bound("builtins")?
                .getattr("tuple")?
                .getattr("__new__")?
                .unbind(),
            change,
            new_object: py
                .import_bound("builtins")?
                .getattr("object")?
                .getattr("__new__")?
                .unbind(),
            kinds: [kinds.0, kinds.1, kinds.2, kinds.3],
            no_changes: PyTuple::empty_bound(py).unbind(),
            delegate,
            lent: None,
        })
    }

    /// Stitch one event; returns the same `LinkResult` as `IdentityGraph.link`.
    fn link(&mut self, py: Python<'_>, ev: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        self.take_back(py)?;
        let typ: String = ev.getattr(pyo3::intern!(py, "type"))?.extract()?;
        if typ == "erase" {
            self.g.flush(py)?;
            self.g.forget();
            let result = self.delegate.bind(py).call1((ev,));
            self.g.load(py)?;
            return Ok(result?.unbind());
        }
        let mut held = None;
        let event = self.event(py, ev, &typ, &mut held)?;
        let out = self.g.link(py, &event)?;
        let changes: Bound<'_, PyTuple> = if out.changes.is_empty() {
            self.no_changes.bind(py).clone()
        } else {
            let objs = out
                .changes
                .iter()
                .map(|c| self.change_object(py, c))
                .collect::<PyResult<Vec<_>>>()?;
            PyTuple::new_bound(py, objs)
        };
        // `tuple.__new__(LinkResult, ...)`: the namedtuple's own `__new__` is a Python function (a frame per event)
        let fields = PyTuple::new_bound(
            py,
            [
                out.profile_id.into_py(py),
                changes.into_py(py),
                out.anchor.into_py(py),
            ],
        );
        Ok(self
            .new_tuple
            .bind(py)
            .call1((self.link_result.bind(py), fields))?
            .unbind())
    }

    /// Write everything buffered (the lent Python graph's too) to the store.
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        match &self.lent {
            Some(graph) => graph.bind(py).call_method0("flush").map(|_| ()),
            None => self.g.flush(py),
        }
    }

    /// Flush, then lend a Python graph over the same store (made by `factory`) until the next link.
    fn lend(&mut self, py: Python<'_>, factory: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        self.take_back(py)?;
        self.g.flush(py)?;
        self.g.forget();
        let graph = factory.call0()?.unbind();
        self.lent = Some(graph.clone_ref(py));
        Ok(graph)
    }

    /// Entries (and entry bytes) in the engine's caches: what its memory grows with.
    fn cache_sizes(&self, py: Python<'_>) -> PyResult<PyObject> {
        let out = PyDict::new_bound(py);
        for (name, n) in self.g.cache_sizes() {
            out.set_item(name, n)?;
        }
        Ok(out.into_any().unbind())
    }

    /// The counters, as `IdentityGraph.stats` holds them (a copy).
    fn stats(&mut self, py: Python<'_>) -> PyResult<PyObject> {
        if let Some(graph) = &self.lent {
            let copy = py.import_bound("copy")?;
            return Ok(copy
                .call_method1("deepcopy", (graph.bind(py).getattr("stats")?,))?
                .unbind());
        }
        self.g.fold_counters()?;
        let json = py.import_bound("json")?;
        let text = serde_json::to_string(&self.g.stats)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(json.call_method1("loads", (text,))?.unbind())
    }
}

/// `object.__setattr__(obj, name, value)` without a call through Python: sets the slot of a frozen
/// dataclass, whose own `__setattr__` refuses.
fn set_slot(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // SAFETY: the three objects are alive for the call (borrowed); the function takes no reference
    let status =
        unsafe { pyo3::ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    match status {
        0 => Ok(()),
        _ => Err(PyErr::fetch(obj.py())),
    }
}

fn slots_of(d: &Bound<'_, PyAny>) -> PyResult<Vec<(String, i64, i64)>> {
    let d = d.downcast::<PyDict>()?;
    let mut slots = Vec::with_capacity(d.len());
    for (name, slot) in d.iter() {
        let Ok([count, at]) = <[i64; 2]>::try_from(slot.extract::<Vec<i64>>()?) else {
            return Err(PyValueError::new_err(
                "a channel or source slot is [count, last seen]",
            ));
        };
        slots.push((name.extract()?, count, at));
    }
    Ok(slots)
}

fn record_of(r: &Bound<'_, PyAny>) -> PyResult<state::Rec> {
    let r = r.downcast::<PyList>()?;
    if r.len() != 8 {
        return Err(PyValueError::new_err("an identifier record has 8 fields"));
    }
    // a flag stored as 0 / 1 by another tool stays an integer until the graph sets True
    let verified = r.get_item(4)?;
    let (verified, verified_as) = match verified.downcast::<PyBool>() {
        Ok(flag) => (flag.is_true(), None),
        Err(_) => {
            let n: i64 = verified.extract()?;
            (n != 0, Some(n))
        }
    };
    let nb = r.get_item(7)?;
    Ok(state::Rec {
        typ: r.get_item(0)?.extract()?,
        first: r.get_item(1)?.extract()?,
        last: r.get_item(2)?.extract()?,
        source: r.get_item(3)?.extract()?,
        verified,
        verified_as,
        via: r.get_item(5)?.extract()?,
        origin: r.get_item(6)?.extract()?,
        nb: if nb.is_none() {
            None
        } else {
            Some(nb.extract()?)
        },
    })
}

/// A `ProfileState` as its stored row (`Profile::to_row`), read from its attributes: the Python graph writes
/// the engine's bytes without a codec of its own (`streams/core/state.py` keeps one for installs without
/// this module, about four times slower).
#[pyfunction]
fn profile_row<'py>(py: Python<'py>, p: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let mut profile = state::Profile {
        id: p.getattr(intern!(py, "id"))?.extract()?,
        status: p.getattr(intern!(py, "status"))?.extract()?,
        seq: p.getattr(intern!(py, "seq"))?.extract()?,
        ..Default::default()
    };
    if !profile.is_active() {
        profile.merged_into = p.getattr(intern!(py, "merged_into"))?.extract()?;
        return Ok(PyBytes::new_bound(py, &profile.to_row()));
    }
    profile.created = p.getattr(intern!(py, "created_ms"))?.extract()?;
    profile.first = p.getattr(intern!(py, "first_ms"))?.extract()?;
    profile.last = p.getattr(intern!(py, "last_ms"))?.extract()?;
    profile.events = p.getattr(intern!(py, "events"))?.extract()?;
    profile.orders = p.getattr(intern!(py, "orders"))?.extract()?;
    for (currency, amount) in p
        .getattr(intern!(py, "revenue"))?
        .downcast::<PyDict>()?
        .iter()
    {
        profile
            .revenue
            .push((currency.extract()?, amount.str()?.extract()?));
    }
    profile.channels = slots_of(&p.getattr(intern!(py, "channels"))?)?;
    profile.sources = slots_of(&p.getattr(intern!(py, "sources"))?)?;
    for (key, r) in p.getattr(intern!(py, "ids"))?.downcast::<PyDict>()?.iter() {
        profile.ids.push((key.extract()?, record_of(&r)?));
    }
    profile.apart = p.getattr(intern!(py, "apart"))?.extract()?;
    profile.merged_from = p.getattr(intern!(py, "merged_from"))?.extract()?;
    profile.split_from = p.getattr(intern!(py, "split_from"))?.extract()?;
    let extra = p.getattr(intern!(py, "extra"))?;
    if extra.is_truthy()? {
        // free-form aggregates: as the JSON orjson writes for them, kept as read
        let json = py.import_bound("orjson")?.call_method1("dumps", (extra,))?;
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(json.downcast::<PyBytes>()?.as_bytes())
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
        profile.extra = fields.into_iter().collect();
    }
    Ok(PyBytes::new_bound(py, &profile.to_row()))
}

/// A stored profile row (either form) as the positional JSON `ProfileState.decode` reads.
#[pyfunction]
fn profile_json<'py>(py: Python<'py>, row: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let profile = state::Profile::from_stored(row).map_err(PyValueError::new_err)?;
    Ok(PyBytes::new_bound(py, &profile.encode()))
}

#[pymodule]
fn omnistitch_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(profile_row, m)?)?;
    m.add_function(wrap_pyfunction!(profile_json, m)?)?;
    Ok(())
}
