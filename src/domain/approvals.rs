//! Approvals: a deferred turn's tool calls wait, as a signed envelope, for a
//! human to approve or reject them.
//!
//! This module owns the rules and the on-disk JSON shapes (so the plan hash
//! and the stored text can never disagree); it reaches storage through the
//! [`ApprovalStore`] port and the approval key through [`ApprovalSigner`].
//!
//! An envelope records one deferred turn:
//! - `scope`: where the turn ran, `{"agent", "session_id", "turn_id"}`: the
//!   agent that asked, the session it asked in and the turn that ended
//!   deferred. A human deciding from a dashboard needs to know which
//!   conversation a request comes from, and the turn id ties the envelope to
//!   the turn's events in the session stream;
//! - `tool_calls`: the requested calls, `[{"tool_call_id", "tool_name", "args"}]`;
//! - `plan_hash`: SHA-256 (hex) of the canonical `{"scope", "tool_calls"}`,
//!   and `signature_hex`: the approval key's Ed25519 signature of those same
//!   canonical bytes, so a plan edited in the database no longer verifies;
//! - a one-way state: `pending`, then `consumed` (approved) or `expired`
//!   (rejected, or never decided before `expires_at`).
//!
//! Canonical JSON is sorted keys and no spaces, UTF-8, exactly what
//! `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`
//! writes in Python.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::session::{SessionId, TurnId};
use crate::ports::{ApprovalEvents, ApprovalSigner, ApprovalStore, ApprovalStoreError};

/// What [`ApprovalDecision::source`] says for decisions taken through this
/// server. The dashboard REST routes are the MCP tools over plain HTTP, as in
/// the original, so every decision here is an MCP decision.
pub const DECISION_SOURCE: &str = "mcp";

/// Where a deferred turn ran: the `scope` of its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalScope {
    pub session_id: SessionId,
    /// Name of the agent whose turn asked for the tools.
    pub agent: String,
    pub turn_id: TurnId,
}

impl ApprovalScope {
    fn to_json(&self) -> Value {
        json!({
            "session_id": self.session_id.as_str(),
            "agent": self.agent,
            "turn_id": self.turn_id.as_str(),
        })
    }
}

/// One tool call waiting for a human.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallRequest {
    pub tool_call_id: String,
    pub tool_name: String,
    /// The arguments as the model produced them.
    pub args: Value,
}

impl ToolCallRequest {
    fn to_json(&self) -> Value {
        json!({
            "tool_call_id": self.tool_call_id,
            "tool_name": self.tool_name,
            "args": self.args,
        })
    }

    /// Reads a stored `tool_calls_json`.
    ///
    /// Rows may have been written by the Python original, so reading is as
    /// lenient as it was there: text that is not a JSON list yields no calls,
    /// entries that are not objects are skipped, a missing id or name reads
    /// as empty and missing args as `{}`.
    #[must_use]
    pub fn list_from_json(raw: &str) -> Vec<Self> {
        let Ok(Value::Array(entries)) = serde_json::from_str::<Value>(raw) else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|entry| match entry {
                Value::Object(mut fields) => Some(Self {
                    tool_call_id: text_field(fields.remove("tool_call_id")),
                    tool_name: text_field(fields.remove("tool_name")),
                    args: fields
                        .remove("args")
                        .unwrap_or_else(|| Value::Object(Map::new())),
                }),
                _ => None,
            })
            .collect()
    }
}

/// A stored JSON field read as text the way Python's `str()` would.
fn text_field(value: Option<Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
    }
}

/// Where an envelope is in its life. The only transitions are `pending` to
/// `consumed` or `expired`, made once, by [`ApprovalService::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    Pending,
    /// Approved: the plan may run, once.
    Consumed,
    /// Rejected. (A pending envelope past `expires_at` is expired too, even
    /// though its stored state still says pending.)
    Expired,
}

impl ApprovalState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Consumed => "consumed",
            Self::Expired => "expired",
        }
    }

    /// The state a decision moves a pending envelope to.
    #[must_use]
    pub fn after_decision(approved: bool) -> Self {
        if approved {
            Self::Consumed
        } else {
            Self::Expired
        }
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApprovalState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "consumed" => Ok(Self::Consumed),
            "expired" => Ok(Self::Expired),
            other => Err(format!("unknown approval state {other:?}")),
        }
    }
}

/// A human's answer to an envelope, kept in its `signed_object_json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalDecision {
    /// Which surface took the decision; [`DECISION_SOURCE`] for this server.
    pub source: String,
    pub approved: bool,
    pub reason: Option<String>,
    /// Epoch seconds, UTC.
    pub decided_at: i64,
}

impl ApprovalDecision {
    /// The stored form: canonical `{"approved","decided_at","reason","source"}`.
    #[must_use]
    pub fn to_canonical_json(&self) -> String {
        canonical_json(&json!({
            "source": self.source,
            "approved": self.approved,
            "reason": self.reason,
            "decided_at": self.decided_at,
        }))
    }

    /// Reads a stored `signed_object_json`. `None` when it holds something
    /// else: the Python original also kept other signed objects there.
    #[must_use]
    pub fn from_json(raw: &str) -> Option<Self> {
        let Value::Object(fields) = serde_json::from_str::<Value>(raw).ok()? else {
            return None;
        };
        Some(Self {
            source: fields.get("source")?.as_str()?.to_owned(),
            approved: fields.get("approved")?.as_bool()?,
            reason: match fields.get("reason") {
                None | Some(Value::Null) => None,
                Some(reason) => Some(reason.as_str()?.to_owned()),
            },
            decided_at: fields.get("decided_at")?.as_i64()?,
        })
    }
}

/// One deferred turn's request for approval, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalEnvelope {
    /// A uuid4, hyphenated.
    pub envelope_id: String,
    /// A uuid4 as 32 hex characters; decisions accept it instead of the id.
    pub nonce: String,
    /// The scope as stored: an [`ApprovalScope`] for envelopes recorded here,
    /// whatever the Python original wrote for its own.
    pub scope: Value,
    pub tool_calls: Vec<ToolCallRequest>,
    /// SHA-256 hex of the canonical `{"scope", "tool_calls"}`.
    pub plan_hash: String,
    /// Which approval key signed the plan.
    pub key_id: String,
    /// Ed25519 signature (hex) of the canonical plan; `None` on rows of the
    /// Python original, which signed elsewhere.
    pub signature_hex: Option<String>,
    pub state: ApprovalState,
    /// Epoch seconds, UTC, as every instant of an envelope.
    pub issued_at: i64,
    pub expires_at: i64,
    /// When the envelope was decided.
    pub consumed_at: Option<i64>,
    pub decision: Option<ApprovalDecision>,
}

impl ApprovalEnvelope {
    /// The first 8 characters of the plan hash: enough for a human to match
    /// an envelope with what a client shows.
    #[must_use]
    pub fn plan_hash_prefix(&self) -> &str {
        self.plan_hash.get(..8).unwrap_or(&self.plan_hash)
    }

    /// The stored `scope_json`.
    #[must_use]
    pub fn scope_json(&self) -> String {
        canonical_json(&self.scope)
    }

    /// The stored `tool_calls_json`.
    #[must_use]
    pub fn tool_calls_json(&self) -> String {
        canonical_json(&tool_calls_value(&self.tool_calls))
    }
}

fn tool_calls_value(tool_calls: &[ToolCallRequest]) -> Value {
    Value::Array(tool_calls.iter().map(ToolCallRequest::to_json).collect())
}

/// Serialises `value` as canonical JSON: object keys sorted (by code point,
/// at every depth), no insignificant whitespace.
///
/// Keys are sorted explicitly rather than trusting `serde_json::Map` to be a
/// B-tree: any crate in the build enabling serde_json's `preserve_order`
/// would otherwise silently change every plan hash.
#[must_use]
pub fn canonical_json(value: &Value) -> String {
    canonicalize(value).to_string()
}

fn canonicalize(value: &Value) -> Value {
    match value {
        Value::Object(fields) => {
            let mut sorted: Vec<_> = fields.iter().collect();
            sorted.sort_unstable_by_key(|&(key, _)| key);
            Value::Object(
                sorted
                    .into_iter()
                    .map(|(key, value)| (key.clone(), canonicalize(value)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonicalize).collect()),
        scalar => scalar.clone(),
    }
}

/// The canonical plan: the bytes the plan hash and the signature cover.
fn canonical_plan(scope: &Value, tool_calls: &[ToolCallRequest]) -> String {
    canonical_json(&json!({"scope": scope, "tool_calls": tool_calls_value(tool_calls)}))
}

/// SHA-256 hex of the canonical `{"scope", "tool_calls"}`.
#[must_use]
pub fn plan_hash(scope: &Value, tool_calls: &[ToolCallRequest]) -> String {
    hex::encode(Sha256::digest(canonical_plan(scope, tool_calls).as_bytes()))
}

/// The id of an approval key: the first 16 hex characters of the SHA-256 of
/// its 32-byte public key.
#[must_use]
pub fn key_id(public_key: &[u8]) -> String {
    let mut id = hex::encode(Sha256::digest(public_key));
    id.truncate(16);
    id
}

/// How long envelopes live and how long decided ones are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// A pending envelope not decided within this time expires.
    pub ttl: Duration,
    /// Envelopes are deleted this long after they expire. A nonce stays
    /// known (so it cannot be mistaken for a new one) at least this long.
    pub retention: Duration,
    /// How often [`ApprovalService::run_pruner`] prunes.
    pub prune_interval: Duration,
    /// Largest canonical `tool_calls_json` an envelope may hold, in bytes.
    /// Every listing and every dashboard carries the arguments, so one huge
    /// call would make each of them slow.
    pub max_args_bytes: usize,
    /// Most envelopes pending at once. A soft cap: the count and the insert
    /// are two statements, so racing turns may pass it by a few.
    pub max_pending: u64,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            max_args_bytes: 64 * 1024,
            max_pending: 1000,
        }
    }
}

/// Page sizes of [`ApprovalService::list_pending`].
pub const DEFAULT_PAGE_SIZE: u64 = 100;
pub const MAX_PAGE_SIZE: u64 = 500;

/// Where a page of pending envelopes starts: just after this envelope in
/// listing order (`issued_at`, then `envelope_id`). A keyset rather than an
/// offset, so that envelopes decided between two pages shift nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalCursor {
    pub issued_at: i64,
    pub envelope_id: String,
}

impl ApprovalCursor {
    fn after(envelope: &ApprovalEnvelope) -> Self {
        Self {
            issued_at: envelope.issued_at,
            envelope_id: envelope.envelope_id.clone(),
        }
    }

    /// The text clients pass back. Opaque to them: hex, so that nobody
    /// builds one by hand and the format may change.
    #[must_use]
    pub fn encode(&self) -> String {
        hex::encode(format!("{}:{}", self.issued_at, self.envelope_id))
    }

    /// Reads [`Self::encode`]'s text; `None` for anything else.
    #[must_use]
    pub fn decode(text: &str) -> Option<Self> {
        let raw = String::from_utf8(hex::decode(text).ok()?).ok()?;
        let (issued_at, envelope_id) = raw.split_once(':')?;
        Some(Self {
            issued_at: issued_at.parse().ok()?,
            envelope_id: envelope_id.to_owned(),
        })
    }
}

/// Which page of the pending list to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// At most this many envelopes, 1 to [`MAX_PAGE_SIZE`].
    limit: u64,
    /// `None`: from the oldest.
    after: Option<ApprovalCursor>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            limit: DEFAULT_PAGE_SIZE,
            after: None,
        }
    }
}

/// Why a page request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("limit must be between 1 and {MAX_PAGE_SIZE}")]
    Limit,
    #[error("cursor is not one that approval.list returned")]
    Cursor,
}

impl PageRequest {
    /// A page of `limit` envelopes (default [`DEFAULT_PAGE_SIZE`]) after
    /// `cursor` (a `next_cursor` from an earlier page; none: the first).
    ///
    /// # Errors
    /// [`PageError`] when `limit` is 0 or above [`MAX_PAGE_SIZE`], or the
    /// cursor does not read.
    pub fn new(limit: Option<u64>, cursor: Option<&str>) -> Result<Self, PageError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(PageError::Limit);
        }
        // An empty cursor (`?cursor=`) asks for the first page.
        let after = cursor
            .filter(|text| !text.is_empty())
            .map(|text| ApprovalCursor::decode(text).ok_or(PageError::Cursor))
            .transpose()?;
        Ok(Self { limit, after })
    }
}

/// One page of pending envelopes.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingPage {
    /// Oldest first.
    pub items: Vec<ApprovalEnvelope>,
    /// Where the next page starts; `None` on the last one.
    pub next: Option<ApprovalCursor>,
    /// Every pending envelope, not only this page's.
    pub count: u64,
}

/// Why a deferred turn was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No approval key is loaded: nothing can be signed, so nothing is
    /// recorded (the runtime's `DeferredApprovalLocked`).
    #[error("approval needed but the approval key is locked")]
    Locked,
    /// The calls' arguments are over [`ApprovalPolicy::max_args_bytes`].
    #[error(
        "the tool calls take {bytes} bytes of JSON, over the {max} an approval may hold; nothing was recorded"
    )]
    TooLarge { bytes: usize, max: usize },
    /// [`ApprovalPolicy::max_pending`] envelopes are pending already.
    #[error("{max} approvals are pending already, the most allowed; nothing was recorded")]
    TooManyPending { max: u64 },
    #[error("approval storage unavailable: {0}")]
    Unavailable(String),
}

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    /// No pending, unexpired envelope has this id or nonce: it never existed,
    /// was decided already (by another client, perhaps a moment earlier) or
    /// expired.
    #[error("approval not found: {approval_id}")]
    NotFound { approval_id: String },
    #[error("approval storage unavailable: {0}")]
    Unavailable(String),
}

/// Approval operations offered to every transport.
///
/// `record_deferred` and `decide` tell the listeners ([`ApprovalEvents`])
/// of each change they make, whoever asked for it, and return the envelope
/// they changed.
pub struct ApprovalService {
    store: Arc<dyn ApprovalStore>,
    /// `None` while approvals are locked: no key, no new envelopes.
    signer: Option<Arc<dyn ApprovalSigner>>,
    policy: ApprovalPolicy,
    /// Told of every envelope recorded or decided.
    events: Arc<dyn ApprovalEvents>,
}

impl ApprovalService {
    #[must_use]
    pub fn new(
        store: Arc<dyn ApprovalStore>,
        signer: Option<Arc<dyn ApprovalSigner>>,
        policy: ApprovalPolicy,
        events: Arc<dyn ApprovalEvents>,
    ) -> Self {
        Self {
            store,
            signer,
            policy,
            events,
        }
    }

    /// Whether an approval key is loaded (`approval_unlocked`).
    #[must_use]
    pub fn is_unlocked(&self) -> bool {
        self.signer.is_some()
    }

    /// The loaded key's id, if one is loaded.
    #[must_use]
    pub fn key_id(&self) -> Option<String> {
        self.signer.as_ref().map(|signer| signer.key_id())
    }

    /// Records a deferred turn's tool calls as one pending envelope that
    /// expires `policy.ttl` after `now`.
    ///
    /// # Errors
    /// [`RecordError::Locked`] when no approval key is loaded,
    /// [`RecordError::TooLarge`] and [`RecordError::TooManyPending`] over the
    /// policy's caps (nothing is stored in these three cases),
    /// [`RecordError::Unavailable`] when storage fails. Listeners are told
    /// only of an envelope stored.
    pub async fn record_deferred(
        &self,
        scope: &ApprovalScope,
        tool_calls: Vec<ToolCallRequest>,
        now: DateTime<Utc>,
    ) -> Result<ApprovalEnvelope, RecordError> {
        let signer = self.signer.as_ref().ok_or(RecordError::Locked)?;
        let bytes = canonical_json(&tool_calls_value(&tool_calls)).len();
        if bytes > self.policy.max_args_bytes {
            return Err(RecordError::TooLarge {
                bytes,
                max: self.policy.max_args_bytes,
            });
        }
        let issued_at = now.timestamp();
        let pending = self
            .store
            .count_pending(issued_at)
            .await
            .map_err(record_error)?;
        if pending >= self.policy.max_pending {
            return Err(RecordError::TooManyPending {
                max: self.policy.max_pending,
            });
        }
        let scope = scope.to_json();
        let plan = canonical_plan(&scope, &tool_calls);
        let envelope = ApprovalEnvelope {
            envelope_id: uuid::Uuid::new_v4().to_string(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            plan_hash: hex::encode(Sha256::digest(plan.as_bytes())),
            key_id: signer.key_id(),
            signature_hex: Some(hex::encode(signer.sign(plan.as_bytes()))),
            scope,
            tool_calls,
            state: ApprovalState::Pending,
            issued_at,
            expires_at: issued_at.saturating_add(seconds(self.policy.ttl)),
            consumed_at: None,
            decision: None,
        };
        self.store.insert(&envelope).await.map_err(record_error)?;
        self.events.approvals_changed();
        tracing::info!(
            approval.id = %envelope.envelope_id,
            approval.plan_hash = %envelope.plan_hash_prefix(),
            approval.tool_count = envelope.tool_calls.len(),
            "approval requested"
        );
        Ok(envelope)
    }

    /// How many envelopes wait for a decision at `now`, counted by the
    /// store without reading them.
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    pub async fn count_pending(&self, now: DateTime<Utc>) -> Result<u64, ApprovalStoreError> {
        self.store.count_pending(now.timestamp()).await
    }

    /// One page of the envelopes waiting for a decision at `now`, oldest
    /// first, with the total count. Expired ones are left out.
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    pub async fn list_pending(
        &self,
        now: DateTime<Utc>,
        page: &PageRequest,
    ) -> Result<PendingPage, ApprovalStoreError> {
        let now = now.timestamp();
        // One more than asked says whether a next page exists.
        let mut items = self
            .store
            .list_pending(now, page.after.clone(), page.limit + 1)
            .await?;
        let limit = usize::try_from(page.limit).unwrap_or(usize::MAX);
        let next = (items.len() > limit)
            .then(|| {
                items.truncate(limit);
                items.last().map(ApprovalCursor::after)
            })
            .flatten();
        // When this page is the whole list its items are the count, exactly:
        // a count read apart could disagree with them (an envelope recorded
        // between the two reads).
        let count = if page.after.is_none() && next.is_none() {
            items.len() as u64
        } else {
            self.store.count_pending(now).await?
        };
        Ok(PendingPage { items, next, count })
    }

    /// Approves or rejects the pending envelope whose id or nonce is
    /// `approval_id`. Approval consumes it, rejection expires it; either way
    /// the decision is kept with it. Of two racing decisions exactly one
    /// wins; the other gets [`DecideError::NotFound`].
    ///
    /// # Errors
    /// [`DecideError::NotFound`] when no pending, unexpired envelope has that
    /// id or nonce; [`DecideError::Unavailable`] when storage fails.
    /// Listeners are told only of a decision taken.
    pub async fn decide(
        &self,
        approval_id: &str,
        approved: bool,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<ApprovalEnvelope, DecideError> {
        let decision = ApprovalDecision {
            source: DECISION_SOURCE.to_owned(),
            approved,
            reason,
            decided_at: now.timestamp(),
        };
        let envelope =
            self.store
                .decide(approval_id, &decision)
                .await
                .map_err(|error| match error {
                    ApprovalStoreError::NotFound => DecideError::NotFound {
                        approval_id: approval_id.to_owned(),
                    },
                    ApprovalStoreError::Unavailable(why) => DecideError::Unavailable(why),
                })?;
        self.events.approvals_changed();
        tracing::info!(
            approval.id = %envelope.envelope_id,
            approval.state = %envelope.state,
            "approval decided"
        );
        Ok(envelope)
    }

    /// Deletes envelopes that expired more than `policy.retention` before
    /// `now`: by then each one is decided or was never decided in time, and
    /// its nonce is long unusable. Returns how many went.
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    pub async fn prune(&self, now: DateTime<Utc>) -> Result<u64, ApprovalStoreError> {
        let cutoff = now
            .timestamp()
            .saturating_sub(seconds(self.policy.retention));
        self.store.prune_expired_before(cutoff).await
    }

    /// Prunes now and then every `policy.prune_interval` until `shutdown`
    /// fires.
    pub async fn run_pruner(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(self.policy.prune_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.prune(Utc::now()).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(approvals.removed = removed, "old approvals pruned"),
                Err(error) => tracing::warn!(%error, "approval pruning failed"),
            }
        }
    }
}

fn record_error(error: ApprovalStoreError) -> RecordError {
    match error {
        ApprovalStoreError::NotFound => {
            RecordError::Unavailable("the store lost the new envelope".into())
        }
        ApprovalStoreError::Unavailable(why) => RecordError::Unavailable(why),
    }
}

/// A duration in whole seconds, saturating: policies come from
/// configuration, and an absurd one must not wrap around.
fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use mockall::predicate::eq;

    use super::*;
    use crate::ports::approval_events::MockApprovalEvents;
    use crate::ports::approval_signer::MockApprovalSigner;
    use crate::ports::approval_store::MockApprovalStore;

    const KEY_ID: &str = "0123456789abcdef";

    fn at(epoch: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(epoch, 0).unwrap()
    }

    fn execute(command: &str) -> ToolCallRequest {
        ToolCallRequest {
            tool_call_id: "c1".into(),
            tool_name: "execute".into(),
            args: json!({"command": command}),
        }
    }

    fn scope() -> ApprovalScope {
        ApprovalScope {
            session_id: SessionId::parse("s1").unwrap(),
            agent: "default".into(),
            turn_id: TurnId::generate(),
        }
    }

    fn signer() -> MockApprovalSigner {
        let mut signer = MockApprovalSigner::new();
        signer.expect_key_id().return_const(KEY_ID.to_owned());
        signer.expect_sign().returning(|_| vec![0xab; 64]);
        signer
    }

    /// Listeners that expect to hear of `changes` changes, exactly.
    fn listeners(changes: usize) -> Arc<MockApprovalEvents> {
        let mut events = MockApprovalEvents::new();
        events
            .expect_approvals_changed()
            .times(changes)
            .return_const(());
        Arc::new(events)
    }

    /// Listeners that may hear of any number of changes.
    fn anyone() -> Arc<MockApprovalEvents> {
        let mut events = MockApprovalEvents::new();
        events.expect_approvals_changed().return_const(());
        Arc::new(events)
    }

    fn service(store: MockApprovalStore, signer: Option<MockApprovalSigner>) -> ApprovalService {
        service_telling(store, signer, anyone())
    }

    fn service_telling(
        store: MockApprovalStore,
        signer: Option<MockApprovalSigner>,
        events: Arc<MockApprovalEvents>,
    ) -> ApprovalService {
        ApprovalService::new(
            Arc::new(store),
            signer.map(|s| Arc::new(s) as Arc<dyn ApprovalSigner>),
            ApprovalPolicy::default(),
            events,
        )
    }

    fn pending(id: &str) -> ApprovalEnvelope {
        ApprovalEnvelope {
            envelope_id: id.into(),
            nonce: "00112233445566778899aabbccddeeff".into(),
            scope: json!({}),
            tool_calls: vec![execute("ls")],
            plan_hash: "24c9c3f5c24c4c20".into(),
            key_id: KEY_ID.into(),
            signature_hex: None,
            state: ApprovalState::Pending,
            issued_at: 1_000,
            expires_at: 4_600,
            consumed_at: None,
            decision: None,
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_has_no_spaces() {
        let value =
            json!({"b": "é", "a": [1, {"d": null, "c": true}], "C": {"z": 1.5, "y": "x y"}});
        assert_eq!(
            canonical_json(&value),
            r#"{"C":{"y":"x y","z":1.5},"a":[1,{"c":true,"d":null}],"b":"é"}"#
        );
    }

    #[test]
    fn plan_hash_matches_pythons_sorted_compact_json() {
        // The expected hash is hashlib.sha256(json.dumps(plan, sort_keys=True,
        // separators=(",", ":"), ensure_ascii=False).encode()).hexdigest().
        let scope = json!({"session_id": "s1", "agent": "default", "turn_id": "t1"});
        let calls = vec![ToolCallRequest {
            tool_call_id: "c1".into(),
            tool_name: "execute".into(),
            args: json!({"command": "ls -l", "env": {"B": "2", "A": "é"}}),
        }];
        assert_eq!(
            plan_hash(&scope, &calls),
            "24c9c3f5c24c4c201d31c67aa6d2616f1e1a2a2e08b22662a5512a645b0adae4"
        );
    }

    #[test]
    fn key_id_is_the_first_16_hex_characters_of_the_public_keys_sha256() {
        assert_eq!(key_id(&[0; 32]), "66687aadf862bd77");
        let counting: Vec<u8> = (0..32).collect();
        assert_eq!(key_id(&counting), "630dcd2966c43366");
    }

    #[tokio::test]
    async fn record_deferred_stores_one_signed_pending_envelope() {
        let scope = scope();
        let calls = vec![execute("rm -rf /tmp/x")];
        let expected_scope = json!({
            "agent": "default",
            "session_id": "s1",
            "turn_id": scope.turn_id.as_str(),
        });
        let plan = canonical_json(&json!({
            "scope": expected_scope,
            "tool_calls": [{"args": {"command": "rm -rf /tmp/x"}, "tool_call_id": "c1", "tool_name": "execute"}],
        }));

        let mut signer = MockApprovalSigner::new();
        signer.expect_key_id().return_const(KEY_ID.to_owned());
        signer
            .expect_sign()
            .with(eq(plan.clone().into_bytes()))
            .times(1)
            .returning(|_| vec![0xab; 64]);
        let mut store = MockApprovalStore::new();
        store
            .expect_count_pending()
            .with(eq(1_700_000_000_i64))
            .returning(|_| Ok(0));
        store
            .expect_insert()
            .withf(|envelope| envelope.state == ApprovalState::Pending)
            .times(1)
            .returning(|_| Ok(()));

        let envelope = service_telling(store, Some(signer), listeners(1))
            .record_deferred(&scope, calls.clone(), at(1_700_000_000))
            .await
            .unwrap();

        assert_eq!(envelope.scope, expected_scope);
        assert_eq!(envelope.tool_calls, calls);
        assert_eq!(
            envelope.scope_json(),
            format!(
                r#"{{"agent":"default","session_id":"s1","turn_id":"{}"}}"#,
                scope.turn_id
            )
        );
        assert_eq!(
            envelope.tool_calls_json(),
            r#"[{"args":{"command":"rm -rf /tmp/x"},"tool_call_id":"c1","tool_name":"execute"}]"#
        );
        assert_eq!(
            envelope.plan_hash,
            hex::encode(Sha256::digest(plan.as_bytes()))
        );
        assert_eq!(envelope.plan_hash, plan_hash(&expected_scope, &calls));
        assert_eq!(envelope.key_id, KEY_ID);
        assert_eq!(envelope.signature_hex, Some("ab".repeat(64)));
        assert_eq!(envelope.issued_at, 1_700_000_000);
        assert_eq!(envelope.expires_at, 1_700_003_600);
        assert_eq!(envelope.consumed_at, None);
        assert_eq!(envelope.decision, None);
        assert!(uuid::Uuid::parse_str(&envelope.envelope_id).is_ok());
        assert_eq!(envelope.envelope_id.len(), 36);
        assert_eq!(envelope.nonce.len(), 32);
        assert!(envelope.nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[tokio::test]
    async fn record_deferred_without_a_key_records_nothing() {
        let service = service_telling(MockApprovalStore::new(), None, listeners(0));
        assert!(!service.is_unlocked());
        assert_eq!(service.key_id(), None);
        let result = service
            .record_deferred(&scope(), vec![execute("ls")], Utc::now())
            .await;
        assert_eq!(result, Err(RecordError::Locked));
    }

    #[tokio::test]
    async fn record_deferred_reports_a_storage_failure() {
        let mut store = MockApprovalStore::new();
        store.expect_count_pending().returning(|_| Ok(0));
        store
            .expect_insert()
            .returning(|_| Err(ApprovalStoreError::Unavailable("disk full".into())));
        let result = service_telling(store, Some(signer()), listeners(0))
            .record_deferred(&scope(), vec![execute("ls")], Utc::now())
            .await;
        assert_eq!(result, Err(RecordError::Unavailable("disk full".into())));
    }

    #[tokio::test]
    async fn record_deferred_refuses_arguments_over_the_cap_without_asking_the_store() {
        let policy = ApprovalPolicy {
            max_args_bytes: 100,
            ..ApprovalPolicy::default()
        };
        let service = ApprovalService::new(
            Arc::new(MockApprovalStore::new()),
            Some(Arc::new(signer())),
            policy,
            listeners(0),
        );
        let result = service
            .record_deferred(&scope(), vec![execute(&"x".repeat(100))], Utc::now())
            .await;
        assert!(
            matches!(result, Err(RecordError::TooLarge { max: 100, bytes }) if bytes > 100),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn record_deferred_refuses_once_the_pending_cap_is_reached() {
        let mut store = MockApprovalStore::new();
        store.expect_count_pending().returning(|_| Ok(1000));
        store.expect_insert().never();
        let result = service(store, Some(signer()))
            .record_deferred(&scope(), vec![execute("ls")], Utc::now())
            .await;
        assert_eq!(result, Err(RecordError::TooManyPending { max: 1000 }));
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("nothing was recorded")
        );
    }

    #[tokio::test]
    async fn a_page_asks_one_more_than_its_limit_and_points_at_the_next_one() {
        let mut store = MockApprovalStore::new();
        store
            .expect_list_pending()
            .with(eq(1_234_i64), eq(None), eq(3_u64))
            .returning(|_, _, _| Ok(vec![pending("a"), pending("b"), pending("c")]));
        store
            .expect_count_pending()
            .with(eq(1_234_i64))
            .returning(|_| Ok(7));
        let page = service(store, None)
            .list_pending(at(1_234), &PageRequest::new(Some(2), None).unwrap())
            .await
            .unwrap();
        assert_eq!(page.items, vec![pending("a"), pending("b")]);
        assert_eq!(page.count, 7);
        assert_eq!(
            page.next,
            Some(ApprovalCursor {
                issued_at: 1_000,
                envelope_id: "b".into()
            })
        );
    }

    #[tokio::test]
    async fn the_last_page_has_no_next_cursor_and_a_cursor_reaches_the_store() {
        let cursor = ApprovalCursor {
            issued_at: 1_000,
            envelope_id: "b".into(),
        };
        let mut store = MockApprovalStore::new();
        store
            .expect_list_pending()
            .with(eq(1_234_i64), eq(Some(cursor.clone())), eq(101_u64))
            .returning(|_, _, _| Ok(vec![pending("c")]));
        store.expect_count_pending().returning(|_| Ok(3));
        let page = service(store, None)
            .list_pending(
                at(1_234),
                &PageRequest::new(None, Some(&cursor.encode())).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(page.items, vec![pending("c")]);
        assert_eq!(page.next, None);
    }

    #[tokio::test]
    async fn a_first_page_that_holds_everything_is_its_own_count() {
        let mut store = MockApprovalStore::new();
        store
            .expect_list_pending()
            .returning(|_, _, _| Ok(vec![pending("a"), pending("b")]));
        store.expect_count_pending().never();
        let page = service(store, None)
            .list_pending(at(1_234), &PageRequest::default())
            .await
            .unwrap();
        assert_eq!(page.count, 2);
        assert_eq!(page.next, None);
    }

    #[test]
    fn page_requests_refuse_limits_out_of_range_and_cursors_not_answered_before() {
        assert_eq!(PageRequest::new(None, None), Ok(PageRequest::default()));
        assert!(PageRequest::new(Some(500), None).is_ok());
        assert_eq!(PageRequest::new(Some(0), None), Err(PageError::Limit));
        assert_eq!(PageRequest::new(Some(501), None), Err(PageError::Limit));
        // `?cursor=`: nothing to resume from, so the first page.
        assert_eq!(PageRequest::new(None, Some("")), Ok(PageRequest::default()));
        for bad in ["zz", &hex::encode("no-colon"), &hex::encode("x:id")] {
            assert_eq!(
                PageRequest::new(None, Some(bad)),
                Err(PageError::Cursor),
                "{bad}"
            );
        }
    }

    #[test]
    fn cursors_read_back_from_their_text() {
        let cursor = ApprovalCursor {
            issued_at: -5,
            envelope_id: "0b1c:with-colon".into(),
        };
        assert_eq!(ApprovalCursor::decode(&cursor.encode()), Some(cursor));
    }

    #[tokio::test]
    async fn approving_passes_an_mcp_decision_to_the_store() {
        let mut store = MockApprovalStore::new();
        store
            .expect_decide()
            .withf(|id, decision| {
                id == "nonce-or-id"
                    && *decision
                        == ApprovalDecision {
                            source: "mcp".into(),
                            approved: true,
                            reason: Some("looks fine".into()),
                            decided_at: 2_000,
                        }
            })
            .times(1)
            .returning(|_, decision| {
                Ok(ApprovalEnvelope {
                    state: ApprovalState::after_decision(decision.approved),
                    consumed_at: Some(decision.decided_at),
                    decision: Some(decision.clone()),
                    ..pending("a")
                })
            });
        let decided = service_telling(store, None, listeners(1))
            .decide("nonce-or-id", true, Some("looks fine".into()), at(2_000))
            .await
            .unwrap();
        assert_eq!(decided.state, ApprovalState::Consumed);
        assert_eq!(decided.consumed_at, Some(2_000));
    }

    #[tokio::test]
    async fn rejecting_expires_the_envelope() {
        let mut store = MockApprovalStore::new();
        store
            .expect_decide()
            .withf(|_, decision| !decision.approved && decision.reason.is_none())
            .returning(|_, decision| {
                Ok(ApprovalEnvelope {
                    state: ApprovalState::after_decision(decision.approved),
                    ..pending("a")
                })
            });
        let decided = service_telling(store, None, listeners(1))
            .decide("a", false, None, at(2_000))
            .await
            .unwrap();
        assert_eq!(decided.state, ApprovalState::Expired);
    }

    #[tokio::test]
    async fn deciding_an_unknown_or_decided_envelope_is_not_found() {
        let mut store = MockApprovalStore::new();
        store
            .expect_decide()
            .returning(|_, _| Err(ApprovalStoreError::NotFound));
        let result = service_telling(store, None, listeners(0))
            .decide("gone", true, None, Utc::now())
            .await;
        assert_eq!(
            result,
            Err(DecideError::NotFound {
                approval_id: "gone".into()
            })
        );
    }

    #[tokio::test]
    async fn prune_deletes_what_expired_before_the_retention_window() {
        let mut store = MockApprovalStore::new();
        store
            .expect_prune_expired_before()
            .with(eq(1_000_000 - 7 * 24 * 3600_i64))
            .times(1)
            .returning(|_| Ok(3));
        assert_eq!(service(store, None).prune(at(1_000_000)).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn the_pruner_prunes_at_once_and_stops_on_shutdown() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut store = MockApprovalStore::new();
        let stop = shutdown.clone();
        store
            .expect_prune_expired_before()
            .times(1)
            .returning(move |_| {
                stop.cancel();
                Ok(1)
            });
        tokio::time::timeout(
            Duration::from_secs(5),
            service(store, None).run_pruner(shutdown),
        )
        .await
        .unwrap();
    }

    #[test]
    fn decisions_are_stored_as_canonical_json_and_read_back() {
        let decision = ApprovalDecision {
            source: "mcp".into(),
            approved: false,
            reason: Some("no".into()),
            decided_at: 7,
        };
        let stored = decision.to_canonical_json();
        assert_eq!(
            stored,
            r#"{"approved":false,"decided_at":7,"reason":"no","source":"mcp"}"#
        );
        assert_eq!(ApprovalDecision::from_json(&stored), Some(decision));
        // The original's chat flow kept other signed objects in that column.
        assert_eq!(
            ApprovalDecision::from_json(r#"{"ctx":"x","nonce":"n"}"#),
            None
        );
        assert_eq!(ApprovalDecision::from_json("not json"), None);
    }

    #[test]
    fn stored_tool_calls_are_read_as_leniently_as_the_original_did() {
        assert_eq!(
            ToolCallRequest::list_from_json(
                r#"[{"tool_call_id":"c1","tool_name":"execute","args":{"command":"ls"}},
                    "junk",
                    {"tool_name":"read_file","tool_call_id":7}]"#
            ),
            vec![
                execute("ls"),
                ToolCallRequest {
                    tool_call_id: "7".into(),
                    tool_name: "read_file".into(),
                    args: json!({}),
                },
            ]
        );
        assert_eq!(ToolCallRequest::list_from_json("{}"), Vec::new());
        assert_eq!(ToolCallRequest::list_from_json("not json"), Vec::new());
    }

    #[test]
    fn the_plan_hash_prefix_is_its_first_8_characters() {
        assert_eq!(pending("a").plan_hash_prefix(), "24c9c3f5");
    }

    #[test]
    fn states_read_back_from_their_stored_names() {
        for state in [
            ApprovalState::Pending,
            ApprovalState::Consumed,
            ApprovalState::Expired,
        ] {
            assert_eq!(state.as_str().parse::<ApprovalState>(), Ok(state));
        }
        assert!("approved".parse::<ApprovalState>().is_err());
    }
}
