//! Enums that users and files name by strings (`--quant q8`, `"precision": "f16"`, a sampler's
//! name). strum derives both directions from each enum's variants (`EnumString` parses,
//! `IntoStaticStr` names, `VariantNames` lists); this module gives the error a wrong name gets.
//!
//! An enum opts in with `#[strum(parse_err_ty = crate::Error, parse_err_fn = crate::named::unknown::<Self>)]`
//! and an `impl Named` saying what its names name.

use strum::VariantNames;

use crate::error::Error;

/// An enum parsed from its names: what they name, for errors ("precision", "scheduler").
pub trait Named: VariantNames {
    const WHAT: &'static str;
}

/// The error for `value`, which names no variant of `T`: it lists the names there are.
pub fn unknown<T: Named>(value: &str) -> Error {
    Error::InvalidParameter(format!("{} '{value}': expected one of {}", T::WHAT, alternatives(T::VARIANTS)))
}

/// "a, b or c".
pub fn alternatives(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => only.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}
