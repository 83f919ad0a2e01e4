//! `POST /api/auth/ticket`: a single-use ticket for the URLs browsers open
//! without headers (WebSocket, SSE).

use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use super::auth::TicketBook;
use super::dto::ErrorBody;

pub struct TicketApi {
    pub tickets: Arc<TicketBook>,
}

/// A ticket to put in `?ticket=` on a WebSocket or SSE URL.
#[derive(Debug, Object)]
pub struct Ticket {
    /// Good for one connection.
    pub ticket: String,
    /// Seconds until it expires unused.
    pub expires_in: u64,
}

#[derive(ApiResponse)]
enum TicketReply {
    /// A fresh ticket.
    #[oai(status = 200)]
    Ok(Json<Ticket>),
    /// Too many tickets are outstanding; retry shortly.
    #[oai(status = 429)]
    TooMany(Json<ErrorBody>),
}

#[OpenApi]
impl TicketApi {
    /// Get a connection ticket
    ///
    /// Browsers cannot set `X-API-Key` on `WebSocket` or `EventSource`: a page
    /// that holds the key asks for a ticket here and opens
    /// `/api/ws/{id}?ticket=...` or `/api/sessions/{id}/events?ticket=...`.
    /// Each ticket works once and expires after 30 s.
    #[oai(
        path = "/api/auth/ticket",
        method = "post",
        operation_id = "issue_ticket",
        tag = "ApiTags::System"
    )]
    async fn issue(&self) -> TicketReply {
        match self.tickets.issue() {
            Ok(ticket) => TicketReply::Ok(Json(Ticket {
                ticket,
                expires_in: self.tickets.ttl().as_secs(),
            })),
            Err(exhausted) => TicketReply::TooMany(Json(ErrorBody::new(exhausted.to_string()))),
        }
    }
}
