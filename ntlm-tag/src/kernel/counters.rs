//! Every event the kernel side counts, listed once: its name (the `event` label of
//! `ntlm_tag_kernel_events_total` and the key in `/kernel`) and where its count is kept. The
//! metrics, the admin page and the reader of the kernel's maps all iterate this list.
#![forbid(unsafe_code)]

use ntlm_tag_common::{Counter, XdpCounter};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Where an event's count is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A slot of the sock_ops program's per-CPU `COUNTERS` map.
    SockOps(Counter),
    /// A slot of the XDP program's per-CPU `XDP_COUNTERS` map.
    Xdp(XdpCounter),
    /// Counted by userspace.
    Userspace,
}

macro_rules! kernel_events {
    ($($(#[$doc:meta])* $variant:ident => $name:literal, $slot:expr;)+) => {
        /// An event the kernel side counts.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum KernelEvent { $($(#[$doc])* $variant,)+ }

        impl KernelEvent {
            /// Every event, in the order `/kernel` and the metrics show them.
            pub const ALL: &[KernelEvent] = &[$(KernelEvent::$variant,)+];

            /// The metric label value.
            pub const fn name(self) -> &'static str {
                match self { $(KernelEvent::$variant => $name,)+ }
            }

            /// Where the count is kept.
            pub const fn slot(self) -> Slot {
                match self { $(KernelEvent::$variant => $slot,)+ }
            }
        }
    };
}

kernel_events! {
    Recorded => "recorded", Slot::SockOps(Counter::Recorded);
    Deleted => "deleted", Slot::SockOps(Counter::Deleted);
    InsertFailed => "insert_failed", Slot::SockOps(Counter::InsertFailed);
    CallbacksUnavailable => "callbacks_unavailable", Slot::SockOps(Counter::CallbacksUnavailable);
    ToaAccepted => "toa_accepted", Slot::SockOps(Counter::ToaAccepted);
    ToaUntrusted => "toa_untrusted", Slot::SockOps(Counter::ToaUntrusted);
    ToaMalformed => "toa_malformed", Slot::SockOps(Counter::ToaMalformed);
    IpipJoined => "ipip_joined", Slot::SockOps(Counter::IpipJoined);
    XdpDecapsulated => "xdp_decapsulated", Slot::Xdp(XdpCounter::Decapsulated);
    XdpUntrusted => "xdp_untrusted", Slot::Xdp(XdpCounter::Untrusted);
    XdpSkipped => "xdp_skipped", Slot::Xdp(XdpCounter::Skipped);
    XdpInnerNotTcp => "xdp_inner_not_tcp", Slot::Xdp(XdpCounter::InnerNotTcp);
    XdpInnerNotLocal => "xdp_inner_not_local", Slot::Xdp(XdpCounter::InnerNotLocal);
    /// Accepted connections that had no record.
    LookupMiss => "lookup_miss", Slot::Userspace;
}

impl KernelEvent {
    /// The key in `/kernel`'s `counters`: the name, but `lookup_misses` (as that page always said).
    pub const fn json_key(self) -> &'static str {
        match self {
            KernelEvent::LookupMiss => "lookup_misses",
            other => other.name(),
        }
    }

    fn index(self) -> usize {
        // `ALL` lists every variant in declaration order.
        self as usize
    }
}

/// The counts of every [`KernelEvent`], summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCounters {
    counts: [u64; KernelEvent::ALL.len()],
}

impl Default for KernelCounters {
    fn default() -> Self {
        KernelCounters {
            counts: [0; KernelEvent::ALL.len()],
        }
    }
}

impl KernelCounters {
    /// Reads every event's count from where it is kept.
    pub fn read(mut count: impl FnMut(Slot) -> u64) -> Self {
        let mut counters = KernelCounters::default();
        for &event in KernelEvent::ALL {
            counters.set(event, count(event.slot()));
        }
        counters
    }

    pub fn get(&self, event: KernelEvent) -> u64 {
        self.counts[event.index()]
    }

    pub fn set(&mut self, event: KernelEvent, count: u64) {
        self.counts[event.index()] = count;
    }
}

/// An object of `json_key: count`, in [`KernelEvent::ALL`] order.
impl Serialize for KernelCounters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(KernelEvent::ALL.len()))?;
        for &event in KernelEvent::ALL {
            map.serialize_entry(event.json_key(), &self.get(event))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_is_listed_once_in_declaration_order() {
        for (i, event) in KernelEvent::ALL.iter().enumerate() {
            assert_eq!(event.index(), i, "{event:?}");
        }
    }

    /// `/kernel` shows the keys it always showed, in the same order.
    #[test]
    fn the_admin_page_keeps_its_keys() {
        let json = serde_json::to_string(&KernelCounters::default()).expect("json");
        assert_eq!(
            json,
            "{\"recorded\":0,\"deleted\":0,\"insert_failed\":0,\"callbacks_unavailable\":0,\
             \"toa_accepted\":0,\"toa_untrusted\":0,\"toa_malformed\":0,\"ipip_joined\":0,\
             \"xdp_decapsulated\":0,\"xdp_untrusted\":0,\"xdp_skipped\":0,\
             \"xdp_inner_not_tcp\":0,\"xdp_inner_not_local\":0,\"lookup_misses\":0}"
        );
    }
}
