//! JSON that is read strictly: an object that names a key twice is refused
//! rather than silently keeping the last value (RFC 8259 leaves duplicate
//! names undefined, and two parsers may pick different values).

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// What [`check_unique_keys`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonCheck {
    /// Well-formed, every object's keys distinct.
    Unique,
    /// This key appears twice in one object.
    DuplicateKey(String),
    /// Not JSON at all: the caller's own parser reports that, in its words.
    Malformed,
}

const DUPLICATE: &str = "duplicate key: ";

/// Walks `bytes` once without building a value.
#[must_use]
pub fn check_unique_keys(bytes: &[u8]) -> JsonCheck {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    match deserializer
        .deserialize_any(Walk)
        .and_then(|()| deserializer.end())
    {
        Ok(()) => JsonCheck::Unique,
        Err(error) => {
            let message = error.to_string();
            match message.strip_prefix(DUPLICATE) {
                Some(rest) => JsonCheck::DuplicateKey(
                    rest.rsplit_once(" at line ")
                        .map_or(rest, |(key, _)| key)
                        .to_owned(),
                ),
                None => JsonCheck::Malformed,
            }
        }
    }
}

struct Walk;

impl<'de> de::Deserialize<'de> for Walk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Walk).map(|()| Walk)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Walk>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<Walk>()?;
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("{DUPLICATE}{key}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_in_one_object_is_found_at_any_depth() {
        assert_eq!(
            check_unique_keys(br#"{"content":"a","content":"b"}"#),
            JsonCheck::DuplicateKey("content".into())
        );
        assert_eq!(
            check_unique_keys(br#"{"op":"message","data":{"content":"a","content":"b"}}"#),
            JsonCheck::DuplicateKey("content".into())
        );
        assert_eq!(
            check_unique_keys(br#"[{"a":1},{"a":2,"b":[{"c":1,"c":1}]}]"#),
            JsonCheck::DuplicateKey("c".into())
        );
    }

    #[test]
    fn the_same_key_in_sibling_objects_and_plain_values_pass() {
        assert_eq!(
            check_unique_keys(br#"{"a":{"x":1},"b":{"x":2},"c":[1,"x",null,true,-1.5]}"#),
            JsonCheck::Unique
        );
        assert_eq!(check_unique_keys(b"\"just a string\""), JsonCheck::Unique);
    }

    #[test]
    fn malformed_json_is_left_to_the_caller() {
        assert_eq!(check_unique_keys(b"{\"a\":"), JsonCheck::Malformed);
        assert_eq!(check_unique_keys(b"{} trailing"), JsonCheck::Malformed);
    }
}
