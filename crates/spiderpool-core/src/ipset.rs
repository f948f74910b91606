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
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(entries: &[&str]) -> IpSet {
        IpSet::parse_list(entries, None).unwrap()
    }

    #[test]
    fn parses_single_addresses_and_ranges_of_both_families() {
        let cases: &[(&str, &str, &str, u128)] = &[
            ("10.6.168.60", "10.6.168.60", "10.6.168.60", 1),
            ("10.6.168.60-10.6.168.69", "10.6.168.60", "10.6.168.69", 10),
            (" 10.0.0.0 - 10.0.1.255 ", "10.0.0.0", "10.0.1.255", 512),
            ("fd00::1", "fd00::1", "fd00::1", 1),
            ("fd00::1-fd00::ff", "fd00::1", "fd00::ff", 255),
            (
                "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "::",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                u128::MAX,
            ),
        ];
        for (text, start, end, len) in cases {
            let r: IpRange = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.start(), ip(start), "{text}");
            assert_eq!(r.end(), ip(end), "{text}");
            assert_eq!(r.len(), *len, "{text}");
        }
    }

    #[test]
    fn rejects_bad_entries_naming_them() {
        let cases: &[(&str, &str)] = &[
            (
                "10.6.168.69-10.6.168.60",
                "IP range \"10.6.168.69-10.6.168.60\" is reversed",
            ),
            (
                "fd00::9-fd00::1",
                "IP range \"fd00::9-fd00::1\" is reversed",
            ),
            (
                "10.6.0.1-fd00::1",
                "IP range \"10.6.0.1-fd00::1\" mixes IPv4 and IPv6",
            ),
            ("10.6.0.0/16", "\"10.6.0.0/16\" is not an IP address"),
            ("10.6.0.256", "\"10.6.0.256\" is not an IP address"),
            ("", "\"\" is not an IP address"),
            ("10.6.0.1-", "\"10.6.0.1-\" is not an IP address"),
        ];
        for (text, want) in cases {
            let err = text.parse::<IpRange>().unwrap_err().to_string();
            assert!(err.starts_with(want), "{text}: got {err}");
        }
    }

    #[test]
    fn rejects_overlapping_entries_in_one_list() {
        let err = IpSet::parse_list(&["10.6.168.64", "10.6.168.60-10.6.168.65"], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IP range \"10.6.168.64\" overlaps \"10.6.168.60-10.6.168.65\""
        );
        let err = IpSet::parse_list(&["fd00::1-fd00::10", "fd00::10-fd00::20"], None).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        // Adjacent but disjoint ranges are fine and merge.
        let s = set(&["10.0.0.1-10.0.0.5", "10.0.0.6-10.0.0.9"]);
        assert_eq!(s.to_strings(), ["10.0.0.1-10.0.0.9"]);
    }

    #[test]
    fn rejects_entries_of_the_wrong_family() {
        let err = IpSet::parse_list(&["fd00::1"], Some(IpFamily::V4)).unwrap_err();
        assert_eq!(err.to_string(), "\"fd00::1\" is not an IPv4 address");
    }

    #[test]
    fn difference_and_lowest_member() {
        let pool = set(&["10.6.168.60-10.6.168.69"]);
        let taken = set(&[
            "10.6.168.60",
            "10.6.168.61",
            "10.6.168.63-10.6.168.64",
            "10.6.168.69",
        ]);
        let free = pool.difference(&taken);
        assert_eq!(
            free.to_strings(),
            ["10.6.168.62", "10.6.168.65-10.6.168.68"]
        );
        assert_eq!(free.first(IpFamily::V4), Some(ip("10.6.168.62")));
        assert_eq!(free.len(), 5);
        assert!(free.contains(&ip("10.6.168.66")));
        assert!(!free.contains(&ip("10.6.168.63")));
        assert!(!free.contains(&ip("10.6.168.59")));
        assert_eq!(pool.difference(&pool).first(IpFamily::V4), None);
        assert!(pool.difference(&pool).is_empty());
    }

    #[test]
    fn nth_walks_across_ranges() {
        let s = set(&["10.0.0.1-10.0.0.2", "10.0.0.5", "10.0.0.9-10.0.0.10"]);
        let nth = |n| s.nth_or_last(IpFamily::V4, n).unwrap().to_string();
        assert_eq!(
            [nth(0), nth(1), nth(2), nth(3), nth(4), nth(99)],
            [
                "10.0.0.1",
                "10.0.0.2",
                "10.0.0.5",
                "10.0.0.9",
                "10.0.0.10",
                "10.0.0.10"
            ]
        );
        assert_eq!(s.nth_or_last(IpFamily::V6, 0), None);
    }

    #[test]
    fn sets_keep_families_apart() {
        let s = set(&["10.0.0.1-10.0.0.3", "fd00::1-fd00::2"]);
        assert_eq!(s.len(), 5);
        assert_eq!(s.first(IpFamily::V6), Some(ip("fd00::1")));
        let rest = s.difference(&set(&["10.0.0.1-10.0.0.3"]));
        assert_eq!(rest.first(IpFamily::V4), None);
        assert_eq!(rest.len(), 2);
        assert_eq!(
            s.intersection(&set(&["10.0.0.2-10.0.0.9"])).to_strings(),
            ["10.0.0.2-10.0.0.3"]
        );
    }

    #[test]
    fn large_v6_sets_count_without_overflow() {
        let net: ipnet::IpNet = "fd00::/64".parse().unwrap();
        let s = IpSet::from_net(&net);
        assert_eq!(s.len(), 1u128 << 64);
        let all: ipnet::IpNet = "::/0".parse().unwrap();
        assert_eq!(IpSet::from_net(&all).len(), u128::MAX);
    }

    /// Difference checked against a brute-force model over a small address space.
    #[test]
    fn difference_matches_brute_force() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let mk = |n: &mut dyn FnMut() -> u64| {
                let k = (n() % 5) as usize;
                let ranges: Vec<IpRange> = (0..k)
                    .map(|_| {
                        let a = (n() % 40) as u32;
                        let b = a + (n() % 8) as u32;
                        IpRange::new(IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b)))
                            .unwrap()
                    })
                    .collect();
                IpSet::from_ranges(ranges)
            };
            let a = mk(&mut next);
            let b = mk(&mut next);
            let d = a.difference(&b);
            for v in 0..50u32 {
                let x = IpAddr::V4(Ipv4Addr::from(v));
                assert_eq!(
                    d.contains(&x),
                    a.contains(&x) && !b.contains(&x),
                    "{a} - {b} at {x}"
                );
            }
        }
    }

    #[test]
    fn lowest_and_highest_addresses() {
        let set = IpSet::parse_list(&["10.6.0.1-10.6.0.3", "10.6.0.10-10.6.0.12"], None).unwrap();
        assert_eq!(
            set.lowest(4).to_strings(),
            ["10.6.0.1-10.6.0.3", "10.6.0.10"]
        );
        assert_eq!(set.highest(2).to_strings(), ["10.6.0.11-10.6.0.12"]);
        assert_eq!(set.highest(9), set);
        assert!(set.lowest(0).is_empty());
    }
}
