//! In-memory [`SessionStore`]: sessions live as long as the process.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::message::{History, ModelMessage};
use crate::domain::session::{SessionId, SessionInfo};
use crate::ports::{SessionStore, SessionStoreError};

struct Entry {
    created_at: DateTime<Utc>,
    last_active: DateTime<Utc>,
    messages: History,
    /// Sum of the messages' sizes.
    bytes: usize,
}

impl Entry {
    fn info(&self, id: &SessionId) -> SessionInfo {
        SessionInfo {
            id: id.clone(),
            created_at: self.created_at,
            message_count: self.messages.len(),
            history_bytes: self.bytes,
            last_seq: 0,
        }
    }
}

/// Sessions in a map behind a read-write lock. No operation awaits while
/// holding the lock, so a plain `std` lock is the right tool.
pub struct InMemorySessionStore {
    sessions: RwLock<HashMap<SessionId, Entry>>,
    /// Sessions it holds at most.
    max_sessions: usize,
}

impl Default for InMemorySessionStore {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl InMemorySessionStore {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that refuses to create more than `max_sessions` sessions.
    #[must_use]
    pub fn with_limit(max_sessions: usize) -> Self {
        Self {
            sessions: RwLock::default(),
            max_sessions,
        }
    }
}

#[async_trait]
impl SessionStore for InMemorySessionStore {
    async fn get_or_create(
        &self,
        id: &SessionId,
        now: DateTime<Utc>,
    ) -> Result<SessionInfo, SessionStoreError> {
        let mut sessions = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !sessions.contains_key(id) && sessions.len() >= self.max_sessions {
            return Err(SessionStoreError::TooManySessions(self.max_sessions));
        }
        let entry = sessions.entry(id.clone()).or_insert_with(|| Entry {
            created_at: now,
            last_active: now,
            messages: History::default(),
            bytes: 0,
        });
        entry.last_active = entry.last_active.max(now);
        Ok(entry.info(id))
    }

    async fn list(&self) -> Result<Vec<SessionInfo>, SessionStoreError> {
        let sessions = self.sessions.read().unwrap_or_else(PoisonError::into_inner);
        let mut infos: Vec<SessionInfo> = sessions.iter().map(|(id, e)| e.info(id)).collect();
        infos.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(infos)
    }

    async fn history(&self, id: &SessionId) -> Result<History, SessionStoreError> {
        let sessions = self.sessions.read().unwrap_or_else(PoisonError::into_inner);
        sessions
            .get(id)
            .map(|e| Arc::clone(&e.messages))
            .ok_or(SessionStoreError::NotFound)
    }

    async fn append(
        &self,
        id: &SessionId,
        messages: Vec<ModelMessage>,
        now: DateTime<Utc>,
    ) -> Result<(), SessionStoreError> {
        let mut sessions = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = sessions.get_mut(id).ok_or(SessionStoreError::NotFound)?;
        entry.bytes += messages.iter().map(ModelMessage::size).sum::<usize>();
        Arc::make_mut(&mut entry.messages).extend(messages);
        entry.last_active = entry.last_active.max(now);
        Ok(())
    }

    async fn delete(&self, id: &SessionId) -> Result<(), SessionStoreError> {
        let mut sessions = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        sessions
            .remove(id)
            .map(|_| ())
            .ok_or(SessionStoreError::NotFound)
    }

    async fn idle_since(
        &self,
        idle_since: DateTime<Utc>,
    ) -> Result<Vec<SessionId>, SessionStoreError> {
        let sessions = self.sessions.read().unwrap_or_else(PoisonError::into_inner);
        let mut idle: Vec<(&DateTime<Utc>, &SessionId)> = sessions
            .iter()
            .filter(|(_, e)| e.last_active < idle_since)
            .map(|(id, e)| (&e.last_active, id))
            .collect();
        idle.sort();
        Ok(idle.into_iter().map(|(_, id)| id.clone()).collect())
    }

    fn is_durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn get_or_create_keeps_an_existing_session() {
        let store = InMemorySessionStore::new();
        let t0 = Utc::now();
        let first = store.get_or_create(&id("a"), t0).await.unwrap();
        store
            .append(&id("a"), vec![ModelMessage::user_prompt("hi", t0)], t0)
            .await
            .unwrap();
        let again = store
            .get_or_create(&id("a"), t0 + chrono::Duration::seconds(5))
            .await
            .unwrap();
        assert_eq!(again.created_at, first.created_at);
        assert_eq!(again.message_count, 1);
    }

    #[tokio::test]
    async fn sessions_past_the_limit_are_refused_but_existing_ones_still_open() {
        let store = InMemorySessionStore::with_limit(2);
        store.get_or_create(&id("a"), Utc::now()).await.unwrap();
        store.get_or_create(&id("b"), Utc::now()).await.unwrap();
        assert_eq!(
            store.get_or_create(&id("c"), Utc::now()).await,
            Err(SessionStoreError::TooManySessions(2))
        );
        assert!(store.get_or_create(&id("a"), Utc::now()).await.is_ok());
        store.delete(&id("b")).await.unwrap();
        assert!(store.get_or_create(&id("c"), Utc::now()).await.is_ok());
    }

    #[tokio::test]
    async fn the_history_size_counts_the_text_appended() {
        let store = InMemorySessionStore::new();
        store.get_or_create(&id("a"), Utc::now()).await.unwrap();
        let prompt = ModelMessage::user_prompt("x".repeat(1000), Utc::now());
        store
            .append(&id("a"), vec![prompt.clone(), prompt], Utc::now())
            .await
            .unwrap();
        let info = store.get_or_create(&id("a"), Utc::now()).await.unwrap();
        assert_eq!((info.message_count, info.history_bytes), (2, 2000));
    }

    #[tokio::test]
    async fn unknown_sessions_are_not_found() {
        let store = InMemorySessionStore::new();
        assert_eq!(
            store.history(&id("x")).await,
            Err(SessionStoreError::NotFound)
        );
        assert_eq!(
            store.delete(&id("x")).await,
            Err(SessionStoreError::NotFound)
        );
        assert_eq!(
            store.append(&id("x"), vec![], Utc::now()).await,
            Err(SessionStoreError::NotFound)
        );
    }

    #[tokio::test]
    async fn idle_since_lists_only_sessions_inactive_before_the_cutoff() {
        let store = InMemorySessionStore::new();
        let t0 = Utc::now();
        store.get_or_create(&id("old"), t0).await.unwrap();
        store
            .get_or_create(&id("new"), t0 + chrono::Duration::minutes(10))
            .await
            .unwrap();
        let idle = store
            .idle_since(t0 + chrono::Duration::minutes(5))
            .await
            .unwrap();
        assert_eq!(idle, vec![id("old")]);
    }
}
