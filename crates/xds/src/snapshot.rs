use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash, Hasher},
};

use prost::{Message, Name};

use crate::pb::google::protobuf::Any;

/// Packs a message into `Any` with its type URL.
pub fn pack<T: Message + Name>(msg: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// The full set of resources one proxy should have, by type URL and name, each with a content version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, BTreeMap<String, Versioned>>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Versioned {
    pub(crate) version: String,
    pub(crate) resource: Any,
}

impl Snapshot {
    pub fn insert<T: Message + Name>(&mut self, name: impl Into<String>, msg: &T) {
        let resource = pack(msg);
        let version = content_version(&resource.value);
        self.types
            .entry(T::type_url())
            .or_default()
            .insert(name.into(), Versioned { version, resource });
    }

    pub fn names(&self, type_url: &str) -> BTreeSet<&str> {
        self.types
            .get(type_url)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub(crate) fn resources(&self, type_url: &str) -> impl Iterator<Item = (&String, &Versioned)> {
        self.types.get(type_url).into_iter().flatten()
    }

    /// Decodes one resource; for tests and tools that inspect what a proxy would receive.
    pub fn get<T: Message + Name + Default>(&self, name: &str) -> Option<T> {
        let v = self.types.get(&T::type_url())?.get(name)?;
        T::decode(v.resource.value.as_slice()).ok()
    }
}

/// A version that changes exactly when the content does, so a proxy is never sent what it already has.
pub(crate) fn content_version(bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}
