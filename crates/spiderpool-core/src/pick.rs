//! The pick inside a pool: its lowest free address (usable, not reserved, not in use), or for
//! an allocator that keeps losing races, one spread away from the others'.

use std::net::IpAddr;

use crate::ippool::Pool;
use crate::ipset::IpSet;

/// The lowest address of `pool` that is usable, not reserved and not in use.
pub fn lowest_free(pool: &Pool, reserved: &IpSet, in_use: &IpSet) -> Option<IpAddr> {
    free_set(pool, reserved, in_use).first(pool.family)
}

/// The free addresses of `pool`: usable, not reserved, not in use.
pub fn free_set(pool: &Pool, reserved: &IpSet, in_use: &IpSet) -> IpSet {
    pool.usable().difference(reserved).difference(in_use)
}

/// Addresses never handed out though no SpiderReservedIP names them (beyond upstream, which
/// finds such a conflict only by ARP, if at all): every pool's gateway and every address a
/// Node has (`node_addresses`). The agent and `explain` count them as reserved.
pub fn never_handed_out(pools: &[Pool], node_addresses: impl IntoIterator<Item = IpAddr>) -> IpSet {
    IpSet::from_ips(pools.iter().filter_map(|p| p.gateway).chain(node_addresses))
}

/// How an allocator that keeps losing races for addresses picks among the free ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// `(index, count)`: the allocator's stripe, the addresses whose value is `index` modulo
    /// `count`. Allocators given different indexes never pick the same address from it.
    pub stripe: Option<(u32, u32)>,
    /// Once the stripe has no free address left: which free address to take (modulo their
    /// number), so allocators given different numbers still spread out.
    pub random: u64,
}

/// The address to take from `pool`: the lowest free one, or, for an allocator that keeps
/// losing races (`spread`), the lowest free one of its stripe, else a free one chosen by its
/// random number: racing allocators then stop colliding on the same addresses again and again.
pub fn free_at(
    pool: &Pool,
    reserved: &IpSet,
    in_use: &IpSet,
    spread: Option<Spread>,
) -> Option<IpAddr> {
    let Some(spread) = spread else {
        return lowest_free(pool, reserved, in_use);
    };
    let free = free_set(pool, reserved, in_use);
    if let Some((index, count)) = spread.stripe.filter(|&(_, n)| n > 1) {
        if let Some(ip) = free.first_in_stripe(pool.family, index.into(), count.into()) {
            return Some(ip);
        }
    }
    if free.is_empty() {
        return None;
    }
    free.nth_or_last(pool.family, u128::from(spread.random) % free.len())
}
