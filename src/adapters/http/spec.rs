//! What the middleware in front of every operation answers, written into
//! the spec: the guard's key check (security requirements and the 401),
//! its `Host`/`Origin` checks (403) and the body limit (413, 408).
//!
//! Those answers come before any handler runs, so no operation's
//! `ApiResponse` could declare them truthfully by itself. [`Guarded`]
//! wraps the API and adds them to each operation from the same rules the
//! middleware applies ([`auth::is_public`], [`auth::checks_origin`],
//! [`auth::takes_ticket`], [`limits::reads_body`]), so the spec cannot
//! promise what the server does not do.

use std::collections::HashMap;

use poem::endpoint::BoxEndpoint;
use poem::http::Method;
use poem_openapi::registry::{
    MetaApi, MetaHeader, MetaMediaType, MetaOperation, MetaResponse, Registry,
};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, OpenApi, SecurityScheme};

use super::auth::{self, CHALLENGE};
use super::dto::ErrorBody;
use super::limits;

// The schemes only describe how the key travels: the guard checks it on
// every route before any operation runs, and with auth off (no
// `AUTOPOIESIS_API_KEY`) nothing is checked, which an extractor in each
// handler could not express. So no handler takes them as parameters.

/// The API key in the `X-API-Key` header (when the server runs with
/// `AUTOPOIESIS_API_KEY`).
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header"
)]
#[expect(dead_code, reason = "describes the guard's check; never extracted")]
struct ApiKeyHeader(poem_openapi::auth::ApiKey);

/// The API key as a Bearer token (`Authorization: Bearer KEY`), as OpenAI
/// clients send it.
#[derive(SecurityScheme)]
#[oai(rename = "Bearer", ty = "bearer")]
#[expect(dead_code, reason = "describes the guard's check; never extracted")]
struct BearerToken(poem_openapi::auth::Bearer);

/// A single-use ticket from `POST /api/auth/ticket`, for the stream URLs a
/// browser opens without headers (`EventSource`, `WebSocket`).
#[derive(SecurityScheme)]
#[oai(
    rename = "Ticket",
    ty = "api_key",
    key_name = "ticket",
    key_in = "query"
)]
#[expect(dead_code, reason = "describes the guard's check; never extracted")]
struct TicketQuery(poem_openapi::auth::ApiKey);

const UNAUTHORIZED: &str = "The API key is missing or wrong. Send it in `X-API-Key` or as \
                            `Authorization: Bearer`; the `WWW-Authenticate` header says so too.";
const HOST_REFUSED: &str = "`Host` names a host this server does not answer to \
                            (DNS-rebinding protection; see `--allowed-hosts`).";
const HOST_OR_ORIGIN_REFUSED: &str = "`Host` names a host this server does not answer to \
                                      (DNS-rebinding protection; see `--allowed-hosts`), or \
                                      `Origin` is a page of another site (see `--allowed-origins`).";
const TOO_LARGE: &str = "The request body is larger than `--max-body-bytes`.";
const TOO_SLOW: &str = "The request body did not arrive whole within `--body-timeout`.";

/// The API with the middleware's answers added to every operation.
pub struct Guarded<T>(pub T);

fn error_response(status: u16, description: &'static str) -> MetaResponse {
    MetaResponse {
        description,
        status: Some(status),
        status_range: None,
        content: vec![MetaMediaType {
            content_type: "application/json; charset=utf-8",
            schema: ErrorBody::schema_ref(),
        }],
        headers: Vec::new(),
    }
}

/// Adds to `operation` what the middleware may answer instead of it. A
/// status the operation declares itself stays its own (its description
/// covers the middleware's case too).
fn describe(path: &str, operation: &mut MetaOperation) {
    let method = &operation.method;
    let mut added = Vec::new();
    if auth::is_public(method, path) {
        // One empty requirement: anyone may call it, said explicitly.
        operation.security = vec![HashMap::new()];
    } else {
        let mut schemes = ApiKeyHeader::security_schemes();
        schemes.extend(BearerToken::security_schemes());
        if auth::takes_ticket(path) {
            schemes.extend(TicketQuery::security_schemes());
        }
        operation.security = schemes
            .into_iter()
            .map(|scheme| HashMap::from([(scheme, Vec::new())]))
            .collect();
        let mut unauthorized = error_response(401, UNAUTHORIZED);
        unauthorized.headers.push(MetaHeader {
            name: "WWW-Authenticate".to_owned(),
            description: Some(format!("`{CHALLENGE}`")),
            required: true,
            deprecated: false,
            schema: String::schema_ref(),
        });
        added.push(unauthorized);
    }
    added.push(error_response(
        403,
        if auth::checks_origin(method, path) {
            HOST_OR_ORIGIN_REFUSED
        } else {
            HOST_REFUSED
        },
    ));
    if limits::reads_body(method) {
        added.push(error_response(408, TOO_SLOW));
        added.push(error_response(413, TOO_LARGE));
    }
    let responses = &mut operation.responses.responses;
    for response in added {
        if !responses.iter().any(|r| r.status == response.status) {
            responses.push(response);
        }
    }
    responses.sort_by_key(|r| r.status);
}

impl<T: OpenApi> OpenApi for Guarded<T> {
    fn meta() -> Vec<MetaApi> {
        let mut apis = T::meta();
        for path in apis.iter_mut().flat_map(|api| api.paths.iter_mut()) {
            for operation in &mut path.operations {
                describe(&path.path, operation);
            }
        }
        apis
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
        ApiKeyHeader::register(registry);
        BearerToken::register(registry);
        TicketQuery::register(registry);
        ErrorBody::register(registry);
    }

    fn add_routes(self, route_table: &mut HashMap<String, HashMap<Method, BoxEndpoint<'static>>>) {
        self.0.add_routes(route_table);
    }
}
