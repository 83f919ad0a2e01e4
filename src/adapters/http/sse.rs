//! The session stream over SSE: a subscription as a stream of pre-encoded
//! frames, served by `GET /api/sessions/{id}/events`
//! ([`super::sessions`]). The stream itself is [`crate::adapters::stream`];
//! WebSocket is the other transport over it.

use std::borrow::Cow;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ToJSON, Type};
use serde_json::Value;

use super::dto::self_raw_value;
use crate::adapters::metrics::LiveConnection;
use crate::adapters::stream::{Frame, Subscription};

/// One frame of a session's stream, already encoded as JSON text.
///
/// It implements poem-openapi's `Type` by hand so the pre-encoded frame goes
/// out as is: deriving `Object` would decode and re-encode every event.
pub struct SseFrame(pub Arc<Frame>);

impl Type for SseFrame {
    self_raw_value!();

    fn name() -> Cow<'static, str> {
        "SessionEventFrame".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let mut schema = MetaSchema::new("object");
        schema.description =
            Some(r#"{"op", "data", "seq", "turn_id"}: see docs/websocket.md for every op"#);
        MetaSchemaRef::Inline(Box::new(schema))
    }
}

impl ToJSON for SseFrame {
    fn to_json(&self) -> Option<Value> {
        serde_json::from_str(&self.0.json).ok()
    }
}

/// The replayed frames, then live ones until the hub closes the client (a
/// lagging `EventSource` reconnects by itself with `Last-Event-ID`).
pub fn frames(subscription: Subscription) -> BoxStream<'static, SseFrame> {
    let live = LiveConnection::count("autopoiesis_sse_connections");
    futures::stream::unfold((subscription, live), |(mut sub, live)| async move {
        let frame = sub.next().await?;
        Some((SseFrame(frame), (sub, live)))
    })
    .boxed()
}
