//! Security contexts keyed by the connection-id header value (`--key header`).
//!
//! The acceptor cannot know when the client connection behind an id goes away, so entries are
//! kept until the store is full and then evicted oldest-first (by first use). A reset does not
//! remove an entry, so every key is queued exactly once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use crate::acceptor::SecurityContext;

#[derive(Default)]
struct Inner {
    contexts: HashMap<Vec<u8>, SecurityContext>,
    order: VecDeque<Vec<u8>>,
}

pub struct ContextStore {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl ContextStore {
    pub fn new(capacity: usize) -> ContextStore {
        ContextStore {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// Runs `f` on the context of `key`, creating a Fresh one if needed.
    pub fn with<R>(&self, key: &[u8], f: impl FnOnce(&mut SecurityContext) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner { contexts, order } = &mut *inner;
        if !contexts.contains_key(key) {
            while contexts.len() >= self.capacity {
                match order.pop_front() {
                    Some(oldest) => {
                        contexts.remove(&oldest);
                    }
                    None => break,
                }
            }
            order.push_back(key.to_vec());
        }
        f(contexts.entry(key.to_vec()).or_default())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contexts
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: &str) -> SecurityContext {
        SecurityContext::Authenticated {
            user: user.to_string(),
        }
    }

    #[test]
    fn contexts_are_per_key_and_bounded() {
        let s = ContextStore::new(2);
        s.with(b"a", |c| *c = auth("alice"));
        s.with(b"b", |c| *c = auth("bob"));
        assert_eq!(s.with(b"a", |c| c.clone()), auth("alice"));
        assert_eq!(s.with(b"b", |c| c.clone()), auth("bob"));
        // A third key evicts the oldest ("a").
        assert_eq!(s.with(b"c", |c| c.clone()), SecurityContext::Fresh);
        assert_eq!(s.len(), 2);
        assert_eq!(s.with(b"b", |c| c.clone()), auth("bob"));
        // "a" comes back Fresh and evicts "b".
        assert_eq!(s.with(b"a", |c| c.clone()), SecurityContext::Fresh);
        assert_eq!(s.with(b"b", |c| c.clone()), SecurityContext::Fresh);
        assert_eq!(s.len(), 2);
    }
}
