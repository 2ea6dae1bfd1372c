//! Reading requests from untyped values (JS objects, JSON): every number checked as its option
//! needs (finite; a whole count where a count belongs) and every error naming the option, so that
//! `NaN`, `Infinity`, a string where a number belongs or a negative size is an `InvalidParameter`
//! saying which option and what it must be.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use crate::error::{Error, Result};

/// `T` from `deserializer`; errors as `InvalidParameter("PATH must be …")`, or for the request
/// itself (an unknown option) `InvalidParameter("CALL: …")`.
pub fn request<'de, T: DeserializeOwned, D: Deserializer<'de>>(deserializer: D, call: &str) -> Result<T> {
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let mut path = e.path().to_string();
        let mut message = e.into_inner().to_string();
        if message.starts_with("unknown field") {
            // The path ends in the unknown option itself: name the object it is in.
            message = message.replacen("unknown field", "unknown option", 1);
            path.truncate(path.rfind(['.', '[']).unwrap_or(0));
        }
        Error::InvalidParameter(match path.as_str() {
            "." | "" => format!("{call}: {message}"),
            _ if message.starts_with("must be") => format!("{path} {message}"),
            _ => format!("{path}: {message}"),
        })
    })
}

/// A number as JS has them; null and undefined are None.
struct Number;

impl<'de> Visitor<'de> for Number {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a finite number")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        match v {
            v if v.is_finite() => Ok(Some(v)),
            v if v.is_nan() => Err(E::custom("must be a finite number, not NaN")),
            // As JS writes it.
            v => Err(E::custom(format!("must be a finite number, not {}Infinity", if v < 0.0 { "-" } else { "" }))),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Err(E::custom(format!("must be a finite number, not the string {v:?}")))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Self::Value, E> {
        Err(E::custom(format!("must be a finite number, not {v}")))
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(Number)
    }
}

fn number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    d.deserialize_option(Number)
}

/// A finite number (f64).
pub fn finite<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    number(d)
}

/// A finite number that fits an f32.
pub fn finite_f32<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f32>, D::Error> {
    match number(d)? {
        Some(v) if (v as f32).is_infinite() => Err(de::Error::custom(format!("must be a finite number, not {v:e} (beyond f32)"))),
        v => Ok(v.map(|v| v as f32)),
    }
}

/// A finite f32 that must be given.
pub fn required_f32<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    finite_f32(d)?.ok_or_else(|| de::Error::custom("must be a finite number, not null"))
}

/// A whole number ≥ 0 that JS represents exactly (below 2^53).
fn whole<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    match number(d)? {
        Some(v) if v < 0.0 || v.fract() != 0.0 || v >= 9007199254740992.0 => {
            Err(de::Error::custom(format!("must be a whole number from 0 to 2^53, not {v}")))
        }
        v => Ok(v.map(|v| v as u64)),
    }
}

/// A count or size: a whole number ≥ 0.
pub fn count<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<usize>, D::Error> {
    Ok(whole(d)?.map(|v| v as usize))
}

/// A seed: a whole number ≥ 0 below 2^53.
pub fn seed<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    whole(d)
}

/// A list of counts.
pub fn counts<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<usize>>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Count(#[serde(deserialize_with = "count")] Option<usize>);
    let list: Option<Vec<Count>> = serde::Deserialize::deserialize(d)?;
    list.map(|l| l.into_iter().map(|Count(c)| c.ok_or_else(|| de::Error::custom("must be whole numbers, not null"))).collect()).transpose()
}

/// `[left, top, right, bottom]` pixel counts.
pub fn sides<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<[usize; 4]>, D::Error> {
    let bad = |shown: String| de::Error::custom(format!("must be [left, top, right, bottom] pixel counts, not {shown}"));
    let value: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
    let Some(value) = value else { return Ok(None) };
    let counts: Option<Vec<usize>> = value.as_array().and_then(|a| a.iter().map(|v| v.as_u64().map(|v| v as usize)).collect());
    counts.and_then(|c| <[usize; 4]>::try_from(c).ok()).map(Some).ok_or_else(|| bad(value.to_string()))
}

/// A name out of `T`'s (parsed by its `FromStr`): "must be one of …" otherwise.
pub fn choice<'de, D: Deserializer<'de>, T: FromStr + strum::VariantNames>(d: D) -> std::result::Result<Option<T>, D::Error> {
    let name: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
    let Some(name) = name.filter(|n| !n.is_null()) else { return Ok(None) };
    let names = T::VARIANTS.iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
    let bad = || de::Error::custom(format!("must be one of {names}, not {name}"));
    name.as_str().ok_or_else(bad)?.parse().map(Some).map_err(|_| bad())
}

/// A required [`choice`].
pub fn required_choice<'de, D: Deserializer<'de>, T: FromStr + strum::VariantNames>(d: D) -> std::result::Result<T, D::Error> {
    choice(d)?.ok_or_else(|| de::Error::custom(format!("must be one of {}, not null", T::VARIANTS.join(", "))))
}

/// An option whose null differs from its absence (`Some(None)`: given as null).
pub fn nullable_finite<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<f64>>, D::Error> {
    number(d).map(Some)
}

/// A list of [`choice`]s.
pub fn choices<'de, D: Deserializer<'de>, T: FromStr + strum::VariantNames>(d: D) -> std::result::Result<Option<Vec<T>>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(bound = "")]
    struct Choice<T: FromStr + strum::VariantNames>(#[serde(deserialize_with = "required_choice")] T);
    let list: Option<Vec<Choice<T>>> = serde::Deserialize::deserialize(d)?;
    Ok(list.map(|l| l.into_iter().map(|Choice(c)| c).collect()))
}

/// A request as JS gave it, read whole before it is checked: the browser's deserializer reads
/// only the fields a struct names, so unknown options would pass unseen, and JSON values cannot
/// hold the `NaN` and `Infinity` that must be refused by name.
#[derive(Debug, Clone)]
pub enum Loose {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Loose>),
    Object(Vec<(String, Loose)>),
}

impl<'de> serde::Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Loose, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JS value")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Loose, E> {
                Ok(Loose::Bool(v))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Loose, E> {
                Ok(Loose::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Loose, E> {
                Ok(Loose::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Loose, E> {
                Ok(Loose::Number(v as f64))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Loose, E> {
                Ok(Loose::String(v.to_string()))
            }
            fn visit_unit<E>(self) -> std::result::Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Loose, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Loose, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Loose::Array(items))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Loose, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Loose::Object(entries))
            }
        }
        d.deserialize_any(Any)
    }
}

impl<'de> Deserializer<'de> for Loose {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> std::result::Result<V::Value, Self::Error> {
        use de::value::{MapDeserializer, SeqDeserializer};
        match self {
            Loose::Null => visitor.visit_unit(),
            Loose::Bool(v) => visitor.visit_bool(v),
            // Whole numbers as integers, so integer fields take them.
            Loose::Number(v) if v.fract() == 0.0 && v.abs() < 9007199254740992.0 => visitor.visit_i64(v as i64),
            Loose::Number(v) => visitor.visit_f64(v),
            Loose::String(v) => visitor.visit_string(v),
            Loose::Array(items) => visitor.visit_seq(SeqDeserializer::new(items.into_iter())),
            Loose::Object(entries) => visitor.visit_map(MapDeserializer::new(entries.into_iter())),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> std::result::Result<V::Value, Self::Error> {
        match self {
            Loose::Null => visitor.visit_none(),
            value => visitor.visit_some(value),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> std::result::Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], visitor: V) -> std::result::Result<V::Value, Self::Error> {
        match self {
            Loose::String(name) => visitor.visit_enum(de::IntoDeserializer::<de::value::Error>::into_deserializer(name)),
            other => other.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> de::IntoDeserializer<'de, de::value::Error> for Loose {
    type Deserializer = Loose;
    fn into_deserializer(self) -> Loose {
        self
    }
}
