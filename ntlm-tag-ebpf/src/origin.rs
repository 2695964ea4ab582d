//! The table of tunnel origins: XDP records which balancer delivered a connection's SYN, sock_ops
//! takes it when the connection is established. The layout, the slot hash and why a slot carries a
//! check word are in `ntlm_tag_common::OriginSlot`; this module is the two ends that touch a slot.
//!
//! Every word is stored and loaded once, as one 64-bit access (volatile, so the compiler neither
//! splits nor repeats them): a concurrent writer can mix whole words of two records, never bytes,
//! and the check word catches the mix.

use core::ptr::{addr_of, addr_of_mut};

use ntlm_tag_common::{IpipKey, LpmAddr, OriginSlot, origin_place};

use crate::maps::{IPIP_ORIGIN, mark_ipip_in_use};

/// Names `balancer` as the origin of the inner connection `key`, replacing whatever the slot held.
#[inline(always)]
pub fn record(key: &IpipKey, balancer: LpmAddr) {
    let (index, words, hash) = origin_place(key);
    let Some(slot) = IPIP_ORIGIN.get_ptr_mut(index) else {
        return;
    };
    let record = OriginSlot::record(words, hash, balancer);
    mark_ipip_in_use();
    // SAFETY: `slot` points to a live, 8-aligned OriginSlot in the map for the program's run.
    unsafe {
        let key_words = addr_of_mut!((*slot).key).cast::<u64>();
        for (i, word) in record.key.iter().enumerate() {
            key_words.add(i).write_volatile(*word);
        }
        addr_of_mut!((*slot).balancer[0]).write_volatile(record.balancer[0]);
        addr_of_mut!((*slot).balancer[1]).write_volatile(record.balancer[1]);
        addr_of_mut!((*slot).check).write_volatile(record.check);
    }
}

/// The balancer recorded for `key`, if its slot holds an intact record of it; the slot is then
/// emptied, so a record serves one connection.
#[inline(always)]
pub fn take(key: &IpipKey) -> Option<LpmAddr> {
    let (index, words, hash) = origin_place(key);
    let slot = IPIP_ORIGIN.get_ptr_mut(index)?;
    // SAFETY (all accesses): as in `record`.
    let stored = unsafe {
        let key_words = addr_of!((*slot).key).cast::<u64>();
        OriginSlot {
            key: [
                key_words.read_volatile(),
                key_words.add(1).read_volatile(),
                key_words.add(2).read_volatile(),
                key_words.add(3).read_volatile(),
                key_words.add(4).read_volatile(),
            ],
            balancer: [
                addr_of!((*slot).balancer[0]).read_volatile(),
                addr_of!((*slot).balancer[1]).read_volatile(),
            ],
            check: addr_of!((*slot).check).read_volatile(),
        }
    };
    let balancer = stored.balancer_for(&words, hash)?;
    // A SYN recorded in this slot since the loads above is cleared too: that connection is then
    // identified without its balancer, which is all a lost record ever costs.
    // SAFETY: as above.
    unsafe { addr_of_mut!((*slot).check).write_volatile(0) };
    Some(balancer)
}
