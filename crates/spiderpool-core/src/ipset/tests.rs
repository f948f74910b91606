//! IP sets: parsing, set algebra, counting and picking, with properties over random sets.

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
