//! Schemas of the domain types that serialize as plain JSON values (ids,
//! secrets, money, time, days, services, routes), for the OpenAPI document
//! the host serves. Written by hand, here rather than on the types, so the
//! type definitions stay about the domain.

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::types::{Credits, Day, Route, Service, Timestamp};

fn string_enum(values: impl IntoIterator<Item = &'static str>, d: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .description(Some(d))
        .into()
}

impl PartialSchema for Service {
    fn schema() -> RefOr<Schema> {
        string_enum(Service::ALL.map(Service::as_str), "A kind of AI service.")
    }
}
impl ToSchema for Service {}

impl PartialSchema for Route {
    fn schema() -> RefOr<Schema> {
        string_enum(Route::ALL.map(Route::path), "A gateway route, by its path.")
    }
}
impl ToSchema for Route {}

/// Ids and secrets travel as plain strings.
macro_rules! string_schema {
    ($($t:ty => $d:literal),* $(,)?) => {$(
        impl PartialSchema for $t {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some($d))
                    .into()
            }
        }
        impl ToSchema for $t {}
    )*};
}

string_schema!(
    crate::types::UserId => "A user's id (`usr_...`).",
    crate::types::ApiKeyId => "An API key's public id (not its secret).",
    crate::types::ProviderId => "A provider's id.",
    crate::types::ProvisionId => "A node's id.",
    crate::types::RequestId => "A gateway request's id.",
    crate::types::NotificationId => "A notification's id.",
    crate::types::TokenFamilyId => "A session's token family.",
    crate::secret::Secret => "A secret (key or token), shown once.",
);

impl PartialSchema for Day {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)))
            .description(Some("A UTC day, YYYY-MM-DD."))
            .into()
    }
}
impl ToSchema for Day {}

impl PartialSchema for Credits {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .description(Some("Micro-credits (1 credit = 1,000,000)."))
            .into()
    }
}
impl ToSchema for Credits {}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .description(Some("Milliseconds since the Unix epoch."))
            .into()
    }
}
impl ToSchema for Timestamp {}
