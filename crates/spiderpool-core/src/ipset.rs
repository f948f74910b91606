//! IP address sets: the `ips`, `excludeIPs` and reserved lists of pools, parsed from Spiderpool's
//! text form (`10.6.168.60`, `10.6.168.60-10.6.168.69`, `fd00::1-fd00::ff`) into sorted, disjoint
//! ranges per family, with the set algebra allocation needs (difference, lowest member, counts).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

/// IP family of an address, pool or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The number Spiderpool uses in `spec.ipVersion`: 4 or 6.
    pub fn number(self) -> u8 {
        match self {
            IpFamily::V4 => 4,
            IpFamily::V6 => 6,
        }
    }

    /// Parses `spec.ipVersion` (4 or 6).
    pub fn from_number(n: i64) -> Option<Self> {
        match n {
            4 => Some(IpFamily::V4),
            6 => Some(IpFamily::V6),
            _ => None,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IPv{}", self.number())
    }
}

/// An IP list entry that could not be parsed or does not fit with its neighbours.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IpRangeError {
    /// Not an IP address or `start-end` range.
    #[error("{0:?} is not an IP address or an IP range like 10.6.168.60-10.6.168.69")]
    Syntax(String),
    /// The range's start comes after its end.
    #[error("IP range {0:?} is reversed: its start is after its end")]
    Reversed(String),
    /// The range's ends are of different families.
    #[error("IP range {0:?} mixes IPv4 and IPv6")]
    MixedFamilies(String),
    /// The entry is not of the family the list must hold.
    #[error("{entry:?} is not an {family} address")]
    WrongFamily {
        /// The offending entry.
        entry: String,
        /// The expected family.
        family: IpFamily,
    },
    /// Two entries of one list share addresses.
    #[error("IP range {0:?} overlaps {1:?}")]
    Overlap(String, String),
}

/// One inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpRange {
    family: IpFamily,
    start: u128,
    end: u128,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(family: IpFamily, v: u128) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl IpRange {
    /// A range from `start` to `end`, both included. `None` when the families differ or
    /// `start > end`.
    pub fn new(start: IpAddr, end: IpAddr) -> Option<Self> {
        let family = IpFamily::of(&start);
        if family != IpFamily::of(&end) || to_u128(start) > to_u128(end) {
            return None;
        }
        Some(IpRange {
            family,
            start: to_u128(start),
            end: to_u128(end),
        })
    }

    /// A range holding only `ip`.
    pub fn single(ip: IpAddr) -> Self {
        IpRange {
            family: IpFamily::of(&ip),
            start: to_u128(ip),
            end: to_u128(ip),
        }
    }

    /// The family of the range.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The first address.
    pub fn start(&self) -> IpAddr {
        from_u128(self.family, self.start)
    }

    /// The last address.
    pub fn end(&self) -> IpAddr {
        from_u128(self.family, self.end)
    }

    /// How many addresses the range holds (saturating at `u128::MAX`).
    pub fn len(&self) -> u128 {
        (self.end - self.start).saturating_add(1)
    }

    /// Always false: a range holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn overlaps(&self, other: &IpRange) -> bool {
        self.family == other.family && self.start <= other.end && other.start <= self.end
    }
}

impl FromStr for IpRange {
    type Err = IpRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let parse = |t: &str| {
            t.trim()
                .parse::<IpAddr>()
                .map_err(|_| IpRangeError::Syntax(s.to_string()))
        };
        match text.split_once('-') {
            None => Ok(IpRange::single(parse(text)?)),
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                if IpFamily::of(&a) != IpFamily::of(&b) {
                    return Err(IpRangeError::MixedFamilies(s.to_string()));
                }
                IpRange::new(a, b).ok_or_else(|| IpRangeError::Reversed(s.to_string()))
            }
        }
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start())
        } else {
            write!(f, "{}-{}", self.start(), self.end())
        }
    }
}

/// Sorted, disjoint, non-adjacent inclusive ranges of one family, as raw integers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    fn from_unsorted(mut v: Vec<(u128, u128)>) -> Self {
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        Ranges(out)
    }

    fn difference(&self, other: &Ranges) -> Ranges {
        let mut out = Vec::with_capacity(self.0.len());
        let mut j = 0;
        for &(mut s, e) in &self.0 {
            while j < other.0.len() && other.0[j].1 < s {
                j += 1;
            }
            let mut k = j;
            let mut open = true;
            while k < other.0.len() && other.0[k].0 <= e {
                let (os, oe) = other.0[k];
                if os > s {
                    out.push((s, os - 1));
                }
                if oe >= e {
                    open = false;
                    break;
                }
                s = oe + 1;
                k += 1;
            }
            if open {
                out.push((s, e));
            }
        }
        Ranges(out)
    }

    fn intersection(&self, other: &Ranges) -> Ranges {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            let (s, e) = (a.0.max(b.0), a.1.min(b.1));
            if s <= e {
                out.push((s, e));
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        Ranges(out)
    }

    fn contains(&self, v: u128) -> bool {
        match self.0.binary_search_by(|&(s, _)| s.cmp(&v)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => self.0[i - 1].1 >= v,
        }
    }

    fn len(&self) -> u128 {
        self.0.iter().fold(0u128, |acc, (s, e)| {
            acc.saturating_add((e - s).saturating_add(1))
        })
    }
}

/// A set of IPv4 and IPv6 addresses kept as sorted disjoint ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Ranges,
    v6: Ranges,
}

impl IpSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses an IP list as the CRDs write it. Entries may not overlap each other; when `family`
    /// is given every entry must be of that family.
    pub fn parse_list<S: AsRef<str>>(
        entries: &[S],
        family: Option<IpFamily>,
    ) -> Result<Self, IpRangeError> {
        let mut parsed: Vec<(IpRange, &str)> = Vec::with_capacity(entries.len());
        for entry in entries {
            let text = entry.as_ref();
            let range: IpRange = text.parse()?;
            if let Some(f) = family {
                if range.family != f {
                    return Err(IpRangeError::WrongFamily {
                        entry: text.to_string(),
                        family: f,
                    });
                }
            }
            parsed.push((range, text));
        }
        let mut sorted: Vec<&(IpRange, &str)> = parsed.iter().collect();
        sorted.sort_by_key(|(r, _)| (r.family, r.start));
        for pair in sorted.windows(2) {
            if pair[0].0.overlaps(&pair[1].0) {
                return Err(IpRangeError::Overlap(
                    pair[1].1.trim().to_string(),
                    pair[0].1.trim().to_string(),
                ));
            }
        }
        Ok(Self::from_ranges(parsed.into_iter().map(|(r, _)| r)))
    }

    /// The union of `ranges` (overlaps allowed).
    pub fn from_ranges(ranges: impl IntoIterator<Item = IpRange>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for r in ranges {
            match r.family {
                IpFamily::V4 => v4.push((r.start, r.end)),
                IpFamily::V6 => v6.push((r.start, r.end)),
            }
        }
        IpSet {
            v4: Ranges::from_unsorted(v4),
            v6: Ranges::from_unsorted(v6),
        }
    }

    /// The set of the given addresses.
    pub fn from_ips(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Self::from_ranges(ips.into_iter().map(IpRange::single))
    }

    /// All addresses of `net`, network and broadcast addresses included.
    pub fn from_net(net: &ipnet::IpNet) -> Self {
        let r = IpRange::new(net.network(), net.broadcast()).expect("a network is ordered");
        Self::from_ranges([r])
    }

    /// Addresses in `self` but not in `other`.
    pub fn difference(&self, other: &IpSet) -> IpSet {
        IpSet {
            v4: self.v4.difference(&other.v4),
            v6: self.v6.difference(&other.v6),
        }
    }

    /// Addresses in both sets.
    pub fn intersection(&self, other: &IpSet) -> IpSet {
        IpSet {
            v4: self.v4.intersection(&other.v4),
            v6: self.v6.intersection(&other.v6),
        }
    }

    /// Addresses in either set.
    pub fn union(&self, other: &IpSet) -> IpSet {
        Self::from_ranges(self.ranges().chain(other.ranges()))
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.v4.contains(to_u128(*ip)),
            IpAddr::V6(_) => self.v6.contains(to_u128(*ip)),
        }
    }

    /// How many addresses the set holds (saturating).
    pub fn len(&self) -> u128 {
        self.v4.len().saturating_add(self.v6.len())
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.v4.0.is_empty() && self.v6.0.is_empty()
    }

    /// The lowest address of `family` in the set.
    pub fn first(&self, family: IpFamily) -> Option<IpAddr> {
        let r = match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        };
        r.0.first().map(|&(s, _)| from_u128(family, s))
    }

    /// The `n`-th lowest address of `family` (0 is the lowest), or the highest one when the set
    /// holds fewer than `n + 1`.
    pub fn nth_or_last(&self, family: IpFamily, n: u128) -> Option<IpAddr> {
        let r = match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        };
        let mut left = n;
        for &(s, e) in &r.0 {
            let len = (e - s).saturating_add(1);
            if left < len {
                return Some(from_u128(family, s + left));
            }
            left -= len;
        }
        r.0.last().map(|&(_, e)| from_u128(family, e))
    }

    /// The lowest address of `family` whose value is `index` modulo `count`: the first of the
    /// set in one of `count` interleaved stripes of the address space.
    pub fn first_in_stripe(&self, family: IpFamily, index: u128, count: u128) -> Option<IpAddr> {
        if count == 0 {
            return None;
        }
        let r = match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        };
        let index = index % count;
        r.0.iter().find_map(|&(s, e)| {
            let x = s.checked_add((index + count - s % count) % count)?;
            (x <= e).then(|| from_u128(family, x))
        })
    }

    /// The `n` lowest addresses of the set (IPv4 before IPv6), or all of them when it holds
    /// fewer.
    pub fn lowest(&self, n: u128) -> IpSet {
        let mut left = n;
        let mut out = Vec::new();
        for r in self.ranges() {
            if left == 0 {
                break;
            }
            let take = r.len().min(left);
            out.push(IpRange {
                end: r.start + (take - 1),
                ..r
            });
            left -= take;
        }
        Self::from_ranges(out)
    }

    /// The `n` highest addresses of the set (IPv6 before IPv4), or all of them when it holds
    /// fewer.
    pub fn highest(&self, n: u128) -> IpSet {
        let mut left = n;
        let mut out = Vec::new();
        let all: Vec<IpRange> = self.ranges().collect();
        for r in all.into_iter().rev() {
            if left == 0 {
                break;
            }
            let take = r.len().min(left);
            out.push(IpRange {
                start: r.end - (take - 1),
                ..r
            });
            left -= take;
        }
        Self::from_ranges(out)
    }

    /// The set's ranges, IPv4 first, each in ascending order.
    pub fn ranges(&self) -> impl Iterator<Item = IpRange> + '_ {
        let v4 = self.v4.0.iter().map(|&(start, end)| IpRange {
            family: IpFamily::V4,
            start,
            end,
        });
        let v6 = self.v6.0.iter().map(|&(start, end)| IpRange {
            family: IpFamily::V6,
            start,
            end,
        });
        v4.chain(v6)
    }

    /// The set in its CRD text form: one entry per range.
    pub fn to_strings(&self) -> Vec<String> {
        self.ranges().map(|r| r.to_string()).collect()
    }
}

impl fmt::Display for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.to_strings().join(","))
    }
}

#[cfg(test)]
mod tests;
