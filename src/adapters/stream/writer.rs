//! Group commit of the session streams: every event the hub numbers goes
//! into one queue, and a single task writes whatever has gathered in it
//! while the previous write ran, in one transaction. A token therefore never
//! waits for its own disk sync, and under load a batch carries hundreds of
//! events for the price of one commit. Terminal events wait for their batch
//! (the hub holds them back from clients until then).

use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};

use super::hub::SessionHub;
use crate::domain::session::SessionId;
use crate::ports::{EventBatch, EventStore, EventStoreError, StoredEvent};

/// Operations waiting in the queue at most; past it an event is not stored
/// (clients still get it; after a crash it is a hole announced by `gap`).
pub const QUEUE: usize = 65_536;
/// Operations one transaction carries at most.
const BATCH: usize = 2048;

/// One queued write.
pub enum Write {
    Event(SessionId, StoredEvent),
    /// Set the stream's reserved high-water mark; the hub hears when stored.
    Reserve(SessionId, u64),
    /// Drop the stream's events at or below this seq.
    Trim(SessionId, u64),
    /// Stop numbering the stream (several instances): another may take it,
    /// numbering above this seq.
    Release(SessionId, u64),
    /// Answers once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// A queued write and who waits for it.
pub struct Queued {
    pub write: Write,
    pub ack: Option<oneshot::Sender<Result<(), EventStoreError>>>,
}

/// Runs until every sender is gone.
pub async fn run(
    store: Arc<dyn EventStore>,
    mut queue: mpsc::Receiver<Queued>,
    hub: Weak<SessionHub>,
    owner: Option<String>,
) {
    let mut items = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut items, BATCH).await > 0 {
        let mut batch = EventBatch {
            owner: owner.clone(),
            ..EventBatch::default()
        };
        let mut acks = Vec::new();
        let mut flushes = Vec::new();
        for item in items.drain(..) {
            match item.write {
                Write::Event(session, event) => batch.events.push((session, event)),
                Write::Reserve(session, upto) => batch.reserve.push((session, upto)),
                Write::Trim(session, upto) => batch.trim.push((session, upto)),
                Write::Release(session, upto) => batch.release.push((session, upto)),
                Write::Flush(done) => flushes.push(done),
            }
            acks.extend(item.ack);
        }
        let reserved = batch.reserve.clone();
        let stored = write(store.as_ref(), batch).await;
        if let Some(hub) = hub.upgrade() {
            for (session, upto) in &reserved {
                hub.reservation_stored(session, *upto, stored.is_ok());
            }
        }
        for ack in acks {
            let _ = ack.send(stored.clone());
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write(store: &dyn EventStore, batch: EventBatch) -> Result<(), EventStoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let events = batch.events.len() as u64;
    let result = store.write(batch).await;
    match &result {
        Ok(()) => metrics::counter!("autopoiesis_stream_events_stored_total").increment(events),
        Err(error) => {
            metrics::counter!("autopoiesis_stream_events_unstored_total").increment(events);
            tracing::error!(%error, events, "session events not stored");
        }
    }
    result
}
