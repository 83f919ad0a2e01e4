//! Histories read lately, kept in memory so that a turn does not read and
//! parse its session's whole history again (a session of a hundred turns
//! would otherwise cost a hundred times more per turn than its first).
//!
//! An entry is good only while the stored session still has the
//! `created_at` and `message_count` it was read at: the store checks both
//! with the one small query it makes anyway. History is append-only and a
//! session created again under the same id has a new `created_at`, so a
//! match means the same messages, even with several servers writing to one
//! database; anything else is read again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use crate::domain::message::{History, ModelMessage};
use crate::domain::session::SessionId;

/// Sessions kept at most.
const MAX_SESSIONS: usize = 1024;
/// History bytes ([`ModelMessage::size`]) kept at most.
const MAX_BYTES: usize = 64 * 1024 * 1024;

struct Entry {
    created_at: i64,
    count: i64,
    messages: History,
    bytes: usize,
}

#[derive(Default)]
struct Entries {
    map: HashMap<SessionId, Entry>,
    /// Insertion order, for evicting the oldest first (may hold ids already
    /// gone from the map).
    order: VecDeque<SessionId>,
    bytes: usize,
}

impl Entries {
    fn remove(&mut self, id: &SessionId) {
        if let Some(entry) = self.map.remove(id) {
            self.bytes -= entry.bytes;
        }
    }

    fn shrink(&mut self) {
        while self.map.len() > MAX_SESSIONS || self.bytes > MAX_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.remove(&oldest);
        }
        // Forget stale ids once they outnumber the live ones.
        if self.order.len() > 2 * MAX_SESSIONS {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }
}

/// The cache; cheap to share behind the store.
#[derive(Default)]
pub struct HistoryCache {
    entries: Mutex<Entries>,
}

fn size(messages: &[ModelMessage]) -> usize {
    messages.iter().map(ModelMessage::size).sum()
}

impl HistoryCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The history kept for the session, if it was read at this
    /// `created_at` and `count`.
    pub fn get(&self, id: &SessionId, created_at: i64, count: i64) -> Option<History> {
        let entries = self.lock();
        let entry = entries.map.get(id)?;
        (entry.created_at == created_at && entry.count == count).then(|| entry.messages.clone())
    }

    /// Keeps a history just read.
    pub fn put(&self, id: &SessionId, created_at: i64, messages: History) {
        let Ok(count) = i64::try_from(messages.len()) else {
            return;
        };
        let bytes = size(&messages);
        let mut entries = self.lock();
        entries.remove(id);
        entries.bytes += bytes;
        entries.map.insert(
            id.clone(),
            Entry {
                created_at,
                count,
                messages,
                bytes,
            },
        );
        entries.order.push_back(id.clone());
        entries.shrink();
    }

    /// Messages appended to the session, which held `before` messages: an
    /// entry at that count grows; any other is dropped.
    pub fn appended(&self, id: &SessionId, before: i64, messages: &[ModelMessage]) {
        let mut entries = self.lock();
        let Entries { map, bytes, .. } = &mut *entries;
        let Some(entry) = map.get_mut(id) else { return };
        let added = i64::try_from(messages.len()).unwrap_or(i64::MAX);
        if entry.count == before {
            std::sync::Arc::make_mut(&mut entry.messages).extend_from_slice(messages);
            entry.count += added;
            let grown = size(messages);
            entry.bytes += grown;
            *bytes += grown;
        } else {
            *bytes -= entry.bytes;
            map.remove(id);
        }
        entries.shrink();
    }

    /// The session is gone.
    pub fn forget(&self, id: &SessionId) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    fn prompt(text: &str) -> ModelMessage {
        ModelMessage::user_prompt(text, Utc::now())
    }

    #[test]
    fn an_entry_serves_only_the_created_at_and_count_it_was_read_at() {
        let cache = HistoryCache::default();
        cache.put(&id("a"), 1, History::new(vec![prompt("x")]));
        assert!(cache.get(&id("a"), 1, 1).is_some());
        assert!(
            cache.get(&id("a"), 1, 2).is_none(),
            "another server appended"
        );
        assert!(
            cache.get(&id("a"), 2, 1).is_none(),
            "deleted and created again"
        );
    }

    #[test]
    fn an_append_at_the_known_count_grows_the_entry_and_any_other_drops_it() {
        let cache = HistoryCache::default();
        cache.put(&id("a"), 1, History::new(vec![prompt("x")]));
        cache.appended(&id("a"), 1, &[prompt("y")]);
        assert_eq!(cache.get(&id("a"), 1, 2).unwrap().len(), 2);
        cache.appended(&id("a"), 5, &[prompt("z")]);
        assert!(cache.get(&id("a"), 1, 3).is_none());
        assert_eq!(cache.lock().bytes, 0);
    }

    #[test]
    fn the_cache_keeps_at_most_its_cap_of_sessions_oldest_out_first() {
        let cache = HistoryCache::default();
        for n in 0..=MAX_SESSIONS {
            cache.put(&id(&format!("s{n}")), 1, History::new(vec![prompt("x")]));
        }
        assert!(cache.get(&id("s0"), 1, 1).is_none());
        assert!(cache.get(&id(&format!("s{MAX_SESSIONS}")), 1, 1).is_some());
        assert_eq!(cache.lock().map.len(), MAX_SESSIONS);
        cache.forget(&id("s1"));
        assert!(cache.get(&id("s1"), 1, 1).is_none());
    }
}
