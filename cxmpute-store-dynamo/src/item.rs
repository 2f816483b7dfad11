//! Items, attribute values and expressions: the small vocabulary every
//! operation of the store is written in.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::Error;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One DynamoDB item (or key): attribute name to value.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// The partition key attribute of the table.
pub(crate) const PK: &str = "pk";
/// The sort key attribute of the table.
pub(crate) const SK: &str = "sk";

/// A string value.
pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number value. DynamoDB numbers travel as decimal text; ours are always integers.
pub(crate) fn n(v: impl Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A list of strings.
pub(crate) fn list_s<I: IntoIterator<Item = S>, S: Into<String>>(v: I) -> AttributeValue {
    AttributeValue::L(v.into_iter().map(|x| s(x)).collect())
}

/// The primary key of an item.
pub(crate) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

/// The error for an item that does not decode: the table holds something
/// this code did not write.
pub(crate) fn corrupt(what: impl Display) -> Error {
    Error::Backend {
        message: format!("malformed item in the DynamoDB table: {what}"),
        source: None,
    }
}

/// Builds an item attribute by attribute.
#[derive(Clone, Debug, Default)]
pub(crate) struct ItemBuilder(Item);

impl ItemBuilder {
    /// An item with this primary key.
    pub(crate) fn new(pk: impl Into<String>, sk: impl Into<String>) -> Self {
        ItemBuilder(key(pk, sk))
    }

    /// An item at this primary key (from the schema's key functions).
    pub(crate) fn at(key: Item) -> Self {
        ItemBuilder(key)
    }

    /// Sets any value.
    pub(crate) fn set(mut self, name: &str, v: AttributeValue) -> Self {
        self.0.insert(name.to_owned(), v);
        self
    }

    /// Sets a string.
    pub(crate) fn s(self, name: &str, v: impl Into<String>) -> Self {
        self.set(name, s(v))
    }

    /// Sets a number.
    pub(crate) fn n(self, name: &str, v: impl Display) -> Self {
        self.set(name, n(v))
    }

    /// Sets a boolean.
    pub(crate) fn b(self, name: &str, v: bool) -> Self {
        self.set(name, AttributeValue::Bool(v))
    }

    /// Sets a string when there is one; absent attributes stand for `None`.
    pub(crate) fn opt_s(self, name: &str, v: Option<impl Into<String>>) -> Self {
        match v {
            Some(v) => self.s(name, v),
            None => self,
        }
    }

    /// Sets a number when there is one.
    pub(crate) fn opt_n(self, name: &str, v: Option<impl Display>) -> Self {
        match v {
            Some(v) => self.n(name, v),
            None => self,
        }
    }

    /// Sets a value as JSON text (nested, free-form data nobody queries).
    pub(crate) fn json<T: Serialize>(self, name: &str, v: &T) -> Result<Self, Error> {
        let text = serde_json::to_string(v)
            .map_err(|e| Error::backend(format!("encoding `{name}`"), e))?;
        Ok(self.s(name, text))
    }

    /// Sets a value as JSON text when there is one.
    pub(crate) fn opt_json<T: Serialize>(self, name: &str, v: Option<&T>) -> Result<Self, Error> {
        match v {
            Some(v) => self.json(name, v),
            None => Ok(self),
        }
    }

    /// The item.
    pub(crate) fn build(self) -> Item {
        self.0
    }
}

/// Reads typed attributes out of an item, failing with a backend error that
/// names the attribute when the item is not what this code writes.
pub(crate) struct Rd<'a> {
    item: &'a Item,
    what: &'static str,
}

impl<'a> Rd<'a> {
    /// A reader of an item of the given kind (used in error messages).
    pub(crate) fn new(item: &'a Item, what: &'static str) -> Self {
        Rd { item, what }
    }

    fn bad(&self, name: &str) -> Error {
        corrupt(format_args!("{} attribute `{name}`", self.what))
    }

    /// A string attribute that must be there.
    pub(crate) fn s(&self, name: &str) -> Result<String, Error> {
        self.opt_s(name)?.ok_or_else(|| self.bad(name))
    }

    /// A string attribute that may be absent.
    pub(crate) fn opt_s(&self, name: &str) -> Result<Option<String>, Error> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.bad(name)),
        }
    }

    /// A number attribute that must be there.
    pub(crate) fn num<T: FromStr>(&self, name: &str) -> Result<T, Error> {
        self.opt_num(name)?.ok_or_else(|| self.bad(name))
    }

    /// A number attribute that may be absent.
    pub(crate) fn opt_num<T: FromStr>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|_| self.bad(name)),
            Some(_) => Err(self.bad(name)),
        }
    }

    /// A number attribute, zero when absent (counters that were never added to).
    pub(crate) fn num_or_zero<T: FromStr + Default>(&self, name: &str) -> Result<T, Error> {
        Ok(self.opt_num(name)?.unwrap_or_default())
    }

    /// A boolean attribute; absent is `false`.
    pub(crate) fn b(&self, name: &str) -> Result<bool, Error> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(false),
            Some(AttributeValue::Bool(v)) => Ok(*v),
            Some(_) => Err(self.bad(name)),
        }
    }

    /// A list of strings; absent is empty.
    pub(crate) fn list_s(&self, name: &str) -> Result<Vec<String>, Error> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(Vec::new()),
            Some(AttributeValue::L(v)) => v
                .iter()
                .map(|x| match x {
                    AttributeValue::S(s) => Ok(s.clone()),
                    _ => Err(self.bad(name)),
                })
                .collect(),
            Some(_) => Err(self.bad(name)),
        }
    }

    /// A key hash stored as hex.
    pub(crate) fn hash(&self, name: &str) -> Result<cxmpute_core::KeyHash, Error> {
        cxmpute_core::KeyHash::from_hex(&self.s(name)?).map_err(|_| self.bad(name))
    }

    /// A string attribute parsed with `FromStr` (ids, enums, hashes).
    pub(crate) fn parse<T: FromStr>(&self, name: &str) -> Result<T, Error> {
        self.s(name)?.parse().map_err(|_| self.bad(name))
    }

    /// A JSON text attribute.
    pub(crate) fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T, Error> {
        self.opt_json(name)?.ok_or_else(|| self.bad(name))
    }

    /// A JSON text attribute that may be absent.
    pub(crate) fn opt_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.opt_s(name)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|_| self.bad(name)),
        }
    }
}

/// The names and values of one expression (or one condition + update pair).
///
/// Every attribute name goes through a `#placeholder`: many of ours (`name`,
/// `status`, `state`, `data`, `units`...) are DynamoDB reserved words, and
/// doing it always is simpler than knowing which.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ex {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Ex {
    /// A fresh, empty expression context.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The placeholder for an attribute name.
    pub(crate) fn n(&mut self, attr: &str) -> String {
        let p = format!("#{attr}");
        self.names.insert(p.clone(), attr.to_owned());
        p
    }

    /// The placeholder for a value.
    pub(crate) fn v(&mut self, v: AttributeValue) -> String {
        let p = format!(":v{}", self.values.len());
        self.values.insert(p.clone(), v);
        p
    }

    /// The names, or `None` when there are none (DynamoDB rejects empty maps).
    pub(crate) fn names(&self) -> Option<HashMap<String, String>> {
        (!self.names.is_empty()).then(|| self.names.clone())
    }

    /// The values, or `None` when there are none.
    pub(crate) fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }

    /// Fails unless every name and value placeholder appears in one of
    /// `exprs`: DynamoDB rejects requests carrying unused ones, and some
    /// emulators do not, so the store checks before sending.
    pub(crate) fn check_used(&self, exprs: &[&str]) -> Result<(), Error> {
        let unused = self
            .names
            .keys()
            .chain(self.values.keys())
            .find(|p| !exprs.iter().any(|e| mentions(e, p)));
        match unused {
            None => Ok(()),
            Some(p) => Err(Error::Backend {
                message: format!("expression placeholder {p} is unused in {exprs:?}"),
                source: None,
            }),
        }
    }

    /// `attribute_exists(pk)`: the item is there.
    pub(crate) fn exists(&mut self) -> String {
        format!("attribute_exists({})", self.n(PK))
    }

    /// `attribute_not_exists(pk)`: the item is not there (create-if-absent).
    pub(crate) fn absent(&mut self) -> String {
        format!("attribute_not_exists({})", self.n(PK))
    }
}

/// Whether `expr` contains the placeholder `p` as a whole token (`:v1` is
/// not mentioned by `:v10`).
fn mentions(expr: &str, p: &str) -> bool {
    expr.match_indices(p).any(|(i, _)| {
        expr[i + p.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

/// A fixed-width decimal text that sorts like the signed millisecond
/// timestamp it encodes, so sort keys order by time.
pub(crate) fn sortable_i64(v: i64) -> String {
    format!("{:020}", (v as u64) ^ (1 << 63))
}

/// A fixed-width decimal text that sorts like the day it encodes.
pub(crate) fn sortable_i32(v: i32) -> String {
    format!("{:010}", (v as u32) ^ (1 << 31))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_placeholders_are_caught() {
        let mut ex = Ex::new();
        let a = ex.n("a");
        let vals: Vec<String> = (0..11).map(|i| ex.v(n(i))).collect();
        assert_eq!((vals[1].as_str(), vals[10].as_str()), (":v1", ":v10"));
        assert!(ex.check_used(&["SET x = y"]).is_err());
        let all = format!("SET {a} = {}", vals.join(" + "));
        assert!(ex.check_used(&[&all]).is_ok());
        // `:v10` is not a mention of `:v1`.
        let without_v1: Vec<&str> = vals
            .iter()
            .filter(|v| v.as_str() != ":v1")
            .map(String::as_str)
            .collect();
        let expr = format!("SET {a} = {}", without_v1.join(" + "));
        assert!(ex.check_used(&[&expr]).is_err());
        assert!(ex.check_used(&[&expr, ":v1"]).is_ok());
    }

    #[test]
    fn sortable_keys_sort_like_numbers() {
        let xs = [i64::MIN, -5, -1, 0, 1, 7, 1_700_000_000_000, i64::MAX];
        for w in xs.windows(2) {
            assert!(sortable_i64(w[0]) < sortable_i64(w[1]), "{w:?}");
        }
        let ds = [i32::MIN, -1, 0, 1, 20_000, i32::MAX];
        for w in ds.windows(2) {
            assert!(sortable_i32(w[0]) < sortable_i32(w[1]), "{w:?}");
        }
    }
}
