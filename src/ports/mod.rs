//! Ports: the traits the domain needs from the outside world. Adapters
//! implement them; the domain holds them as `Arc<dyn Port>`.

pub mod agent_runtime;
pub mod approval_events;
pub mod approval_signer;
pub mod approval_store;
pub mod event_store;
pub mod session_events;
pub mod session_store;
pub mod turn_store;

pub use agent_runtime::{AgentRuntime, EventSink, TurnInput};
pub use approval_events::ApprovalEvents;
pub use approval_signer::ApprovalSigner;
pub use approval_store::{ApprovalStore, ApprovalStoreError};
pub use event_store::{EventBatch, EventStore, EventStoreError, StoredEvent, StreamState};
pub use session_events::SessionEvents;
pub use session_store::{SessionStore, SessionStoreError};
pub use turn_store::{Claim, Enqueued, TurnRecord, TurnStore, TurnStoreError};
