//! Sequence, mapping and enum access over tree nodes.

use serde::de::{self, DeserializeSeed, Visitor};

use super::driver::Session;
use super::error::Error;
use super::node::NodeDe;
use crate::yaml::{Entry, Node};

/// Sequence elements, skipping poisoned ones.
pub(super) struct SeqDe<'a> {
    pub(super) items: std::slice::Iter<'a, Node>,
    pub(super) s: &'a Session<'a>,
}

impl<'a> de::SeqAccess<'a> for SeqDe<'a> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        match self.items.by_ref().find(|n| self.s.live(n)) {
            Some(node) => seed.deserialize(NodeDe { node, s: self.s }).map(Some),
            None => Ok(None),
        }
    }
}

/// Mapping entries already filtered by the caller.
pub(super) struct MapDe<'a> {
    entries: std::vec::IntoIter<&'a Entry>,
    value: Option<&'a Node>,
    s: &'a Session<'a>,
}

impl<'a> MapDe<'a> {
    pub(super) fn new(entries: Vec<&'a Entry>, s: &'a Session<'a>) -> Self {
        Self {
            entries: entries.into_iter(),
            value: None,
            s,
        }
    }
}

impl<'a> de::MapAccess<'a> for MapDe<'a> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some(entry) => {
                self.value = Some(&entry.value);
                seed.deserialize(NodeDe {
                    node: &entry.key,
                    s: self.s,
                })
                .map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'a>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self.value.take().expect("next_value_seed called before next_key_seed");
        seed.deserialize(NodeDe { node, s: self.s })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An enum written as `name` or `name: value`.
pub(super) struct EnumDe<'a> {
    pub(super) variant: NodeDe<'a>,
    pub(super) value: Option<NodeDe<'a>>,
}

impl<'a> de::EnumAccess<'a> for EnumDe<'a> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'a>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let v = seed.deserialize(self.variant)?;
        Ok((v, self))
    }
}

impl<'a> de::VariantAccess<'a> for EnumDe<'a> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.value {
            None => Ok(()),
            Some(v) => de::Deserialize::deserialize(v),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'a>>(self, seed: T) -> Result<T::Value, Error> {
        match self.value {
            Some(v) => seed.deserialize(v),
            None => Err(self.variant.fail("expected a mapping `name: value` for this variant")),
        }
    }

    fn tuple_variant<V: Visitor<'a>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Some(v) => v.seq(visitor),
            None => Err(self
                .variant
                .fail("expected a mapping `name: [values]` for this variant")),
        }
    }

    fn struct_variant<V: Visitor<'a>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Some(v) => de::Deserializer::deserialize_struct(v, "variant", fields, visitor),
            None => Err(self
                .variant
                .fail("expected a mapping `name: {fields}` for this variant")),
        }
    }
}
