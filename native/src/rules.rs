//! Merge protection: `streams/core/rules.py`'s checks over this crate's profiles, with the same rule names and texts.

use rustc_hash::FxHashMap as HashMap;

use crate::state::Profile;

/// A usable identifier of the event being linked.
#[derive(Clone, Debug)]
pub struct Ident {
    /// `type:value`
    pub key: String,
    /// where the type ends in `key` (the type is read from there: one heap block less per identifier)
    pub typ_len: usize,
    pub verified: bool,
}

impl Ident {
    pub fn new(typ: &str, value: &str, verified: bool) -> Self {
        let mut key = String::with_capacity(typ.len() + 1 + value.len());
        key.push_str(typ);
        key.push(':');
        key.push_str(value);
        Ident {
            key,
            typ_len: typ.len(),
            verified,
        }
    }

    pub fn typ(&self) -> &str {
        &self.key[..self.typ_len]
    }
}

#[derive(Clone, Debug)]
pub struct Refusal {
    pub rule: String,
    pub detail: String,
}

/// `_since`: the start of a limit's window (saturating: Python's integers do not wrap, and a start below
/// i64::MIN counts every identifier, as i64::MIN does).
fn since(window: Option<i64>, now: i64) -> Option<i64> {
    window.map(|w| now.saturating_sub(w))
}

fn refusal(rule: impl Into<String>, detail: impl Into<String>) -> Option<Refusal> {
    Some(Refusal {
        rule: rule.into(),
        detail: detail.into(),
    })
}

/// `Rules`, flattened: the wrapper passes every field of the Python dataclass.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub rank: HashMap<String, usize>,
    pub unranked: usize,
    pub protection: bool,
    pub strong: Vec<String>,
    /// sorted, as `check_merge` walks them
    pub unique: Vec<String>,
    pub weak_cannot_bridge: bool,
    pub verified_beats_unverified: bool,
    pub max_identifiers: Option<i64>,
    pub corroborate_soft_bridges: bool,
    /// type → (max, window in ms)
    pub limits: HashMap<String, (i64, Option<i64>)>,
    pub generic: bool,
    pub generic_types: Vec<String>,
    pub generic_max: HashMap<String, i64>,
    pub shared_devices: bool,
    pub shared_types: Vec<String>,
    pub shared_person_types: Vec<String>,
    pub shared_max_people: i64,
}

pub fn contains(set: &[String], t: &str) -> bool {
    set.iter().any(|x| x == t)
}

impl Rules {
    pub fn rank_of(&self, t: &str) -> usize {
        self.rank.get(t).copied().unwrap_or(self.unranked)
    }

    pub fn shared_active(&self) -> bool {
        self.protection && self.shared_devices && !self.shared_types.is_empty()
    }

    pub fn generic_active(&self) -> bool {
        self.protection
            && self.generic
            && !self.generic_types.is_empty()
            && !self.generic_max.is_empty()
    }

    pub fn corroborate_active(&self) -> bool {
        self.protection && self.corroborate_soft_bridges
    }

    pub fn tracks_neighbours(&self) -> bool {
        (self.generic_active() || self.corroborate_active()) && !self.generic_max.is_empty()
    }

    /// `check_attach`: may the new identifier join `p`?
    pub fn check_attach(&self, p: &Profile, ident: &Ident, now: i64) -> Option<Refusal> {
        if !self.protection {
            return None;
        }
        let t = ident.typ();
        if contains(&self.unique, t) && p.type_count(t) > 0 {
            return refusal(
                format!("unique:{t}"),
                format!("profile already holds a {t}"),
            );
        }
        if let Some((max, window)) = self.limits.get(t) {
            if p.count_type(t, since(*window, now)) + 1 > *max {
                return refusal(
                    format!("limit:{t}"),
                    format!("more than {max} {t} per profile"),
                );
            }
        }
        if let Some(cap) = self.max_identifiers {
            if p.ids.len() as i64 + 1 > cap {
                return refusal(
                    "size_cap",
                    format!("more than {cap} identifiers per profile"),
                );
            }
        }
        None
    }

    /// `check_merge`: may profiles `a` and `b` merge, given the event's identifiers in each?
    pub fn check_merge(
        &self,
        a: &Profile,
        b: &Profile,
        side_a: &[Ident],
        side_b: &[Ident],
        now: i64,
        corroborated: bool,
    ) -> Option<Refusal> {
        if !self.protection {
            return None;
        }
        if a.apart.contains(&b.id) || b.apart.contains(&a.id) {
            return refusal("split_apart", "profiles were split apart by an operator");
        }
        for t in &self.unique {
            if a.type_count(t) != 0 && b.type_count(t) != 0 {
                return refusal(
                    format!("unique:{t}"),
                    format!("both profiles hold a different {t}"),
                );
            }
        }
        let strong = &self.strong;
        if self.weak_cannot_bridge {
            let bridge_strong = side_a.iter().any(|i| contains(strong, i.typ()))
                && side_b.iter().any(|i| contains(strong, i.typ()));
            if !bridge_strong && a.has_type_in(strong) && b.has_type_in(strong) {
                return refusal(
                    "weak_bridge",
                    "only weak identifiers link two profiles that each hold a strong one",
                );
            }
        }
        if self.verified_beats_unverified {
            let bridge_verified = side_a
                .iter()
                .any(|i| i.verified && contains(strong, i.typ()))
                && side_b
                    .iter()
                    .any(|i| i.verified && contains(strong, i.typ()));
            if !bridge_verified && self.holds_verified(a) && self.holds_verified(b) {
                return refusal(
                    "unverified_bridge",
                    "an unverified identifier links two profiles that each hold a verified one",
                );
            }
        }
        if self.corroborate_soft_bridges
            && !corroborated
            && a.has_type_in(strong)
            && b.has_type_in(strong)
            && (self.soft(a, side_a) || self.soft(b, side_b))
        {
            return refusal(
                "uncorroborated_bridge",
                "a single unverified value links two identified profiles; waiting for a second sighting",
            );
        }
        let mut types: Vec<&str> = a
            .types
            .iter()
            .chain(b.types.iter())
            .map(|(t, _)| t.as_str())
            .collect();
        types.sort_unstable();
        types.dedup();
        for t in types {
            if let Some((max, window)) = self.limits.get(t) {
                let since = since(*window, now);
                if a.count_type(t, since) + b.count_type(t, since) > *max {
                    return refusal(
                        format!("limit:{t}"),
                        format!("more than {max} {t} per profile"),
                    );
                }
            }
        }
        if let Some(cap) = self.max_identifiers {
            if (a.ids.len() + b.ids.len()) as i64 > cap {
                return refusal(
                    "size_cap",
                    format!("more than {cap} identifiers per profile"),
                );
            }
        }
        None
    }

    /// `is_soft_side`: no verified, no unique-type identifier, fewer than two strong ones.
    fn is_soft_side(&self, side: &[Ident]) -> bool {
        let mut strong = 0;
        for i in side {
            if i.verified || contains(&self.unique, i.typ()) {
                return false;
            }
            if contains(&self.strong, i.typ()) {
                strong += 1;
            }
        }
        strong < 2
    }

    fn soft(&self, p: &Profile, side: &[Ident]) -> bool {
        self.is_soft_side(side) && !self.holds_verified(p) && !p.has_type_in(&self.unique)
    }

    /// `_holds_verified`: a verified *person* identifier is held.
    fn holds_verified(&self, p: &Profile) -> bool {
        p.ids
            .iter()
            .any(|(_, r)| r.verified && contains(&self.strong, &r.typ))
    }
}
