//! Each VM as the API shows it, kept as JSON text per VM and per change.
//!
//! A page of the VM list is read from the database as the page's ids and
//! change times (`updated_at`) only, in one value
//! ([`byteport_store::DataStore::vm_list_versions`]); every VM whose view
//! is here at that very change time is answered from here, and only the
//! others are read and turned into JSON, once per change. A view is keyed
//! by its change time, so it is never stale: a VM changed by any replica
//! has a new `updated_at` and misses. What a view holds besides the row,
//! the project's name, never changes.
//!
//! The map is bounded: past [`CAPACITY`] views it starts again empty.

use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Views kept at most (a view is about a kilobyte).
pub const CAPACITY: usize = 20_000;

type Stamp = chrono::DateTime<chrono::Utc>;

#[derive(Default)]
pub struct VmViews {
    map: Mutex<HashMap<Uuid, (Stamp, VmJson)>>,
}

/// One VM's view, already JSON: it serialises as the `Vm` it was made of.
#[derive(Clone)]
pub struct VmJson(Arc<RawValue>);

impl VmJson {
    pub fn new(vm: &byteport_types::api::Vm) -> serde_json::Result<VmJson> {
        let text = serde_json::to_string(vm)?;
        Ok(VmJson(Arc::from(RawValue::from_string(text)?)))
    }
}

impl Serialize for VmJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl VmViews {
    /// The view of VM `id` as of its change at `at`, if kept.
    pub fn get(&self, id: Uuid, at: Stamp) -> Option<VmJson> {
        let map = self.map.lock().ok()?;
        current(&map, id, at)
    }

    /// [`VmViews::get`] for each of a page's VMs, under one lock.
    pub fn get_many(&self, page: &[(Uuid, Option<Stamp>)]) -> Vec<Option<VmJson>> {
        let Ok(map) = self.map.lock() else {
            return vec![None; page.len()];
        };
        page.iter()
            .map(|(id, at)| current(&map, *id, (*at)?))
            .collect()
    }

    /// Keeps the view of VM `id` as of its change at `at`, unless a later
    /// one is kept already.
    pub fn put(&self, id: Uuid, at: Stamp, view: VmJson) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        if map.len() >= CAPACITY && !map.contains_key(&id) {
            map.clear();
        }
        match map.get(&id) {
            Some((seen, _)) if *seen > at => {}
            _ => {
                map.insert(id, (at, view));
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

/// The view of VM `id` kept at exactly `at`.
fn current(map: &HashMap<Uuid, (Stamp, VmJson)>, id: Uuid, at: Stamp) -> Option<VmJson> {
    map.get(&id)
        .filter(|(seen, _)| *seen == at)
        .map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(text: &str) -> VmJson {
        VmJson(Arc::from(RawValue::from_string(text.to_owned()).unwrap()))
    }

    #[test]
    fn a_view_answers_only_at_its_own_change_time() {
        let v = VmViews::default();
        let id = Uuid::now_v7();
        let t0 = chrono::Utc::now();
        let t1 = t0 + chrono::TimeDelta::microseconds(1);
        v.put(id, t0, view(r#"{"state":"pending"}"#));
        assert_eq!(v.get(id, t0).unwrap().0.get(), r#"{"state":"pending"}"#);
        assert!(v.get(id, t1).is_none(), "a later change misses");
        v.put(id, t1, view(r#"{"state":"running"}"#));
        // An older view read late does not replace a newer one.
        v.put(id, t0, view(r#"{"state":"pending"}"#));
        assert_eq!(v.get(id, t1).unwrap().0.get(), r#"{"state":"running"}"#);
        assert!(v.get(id, t0).is_none());
        let many = v.get_many(&[(id, Some(t1)), (id, Some(t0)), (id, None)]);
        assert_eq!(
            many.iter().map(Option::is_some).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(
            serde_json::to_string(&vec![v.get(id, t1).unwrap()]).unwrap(),
            r#"[{"state":"running"}]"#
        );
    }

    #[test]
    fn the_map_stays_within_its_capacity() {
        let v = VmViews::default();
        let t = chrono::Utc::now();
        for _ in 0..CAPACITY + 10 {
            v.put(Uuid::now_v7(), t, view("{}"));
        }
        assert!(v.len() <= CAPACITY, "{}", v.len());
        assert!(v.len() >= 10);
    }
}
