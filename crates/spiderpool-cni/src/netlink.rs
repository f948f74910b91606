//! A small synchronous rtnetlink client for the coordinator plugin (no async runtime): the
//! messages come from `netlink-packet-route`, the socket from `netlink-sys`. A socket acts in
//! the network namespace it was opened in, so the plugin opens one in the host's namespace and
//! one in the pod's and never has to switch back and forth while it works.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

/// A MAC address as text (`aa:bb:cc:dd:ee:ff`).
pub fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC address from text (`aa:bb:cc:dd:ee:ff`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A link: its index and MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// MAC address (`aa:bb:…`), empty when it has none.
    pub mac: String,
    /// A veth's peer: its interface index (in the peer's namespace).
    pub peer: Option<u32>,
    /// The bridge (or bond) the link is a port of: its interface index.
    pub master: Option<u32>,
}

/// A route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination.
    pub dst: ipnet::IpNet,
    /// Next hop (`None`: on link).
    pub via: Option<IpAddr>,
    /// Outgoing interface.
    pub oif: u32,
    /// Routing table (254: main).
    pub table: u32,
    /// Preferred source address.
    pub src: Option<IpAddr>,
}

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// A route as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: ipnet::IpNet,
    /// Outgoing interface.
    pub oif: Option<u32>,
    /// Routing table.
    pub table: u32,
    /// Next hop.
    pub via: Option<IpAddr>,
    /// Preferred source address.
    pub src: Option<IpAddr>,
    /// A unicast route (not local, broadcast, multicast, ...).
    pub unicast: bool,
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A table number as a message header holds it: itself below 256, else "see the attribute".
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

/// An rtnetlink socket of one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Netlink {
    /// A socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends one request and gathers its answers until the acknowledgement (or, for a dump,
    /// its end); a refusal is the kernel's errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        self.seq = self.seq.wrapping_add(1);
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(message));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                    .map_err(|e| other("netlink answer", e))?;
                let len = m.header.length as usize;
                if m.header.sequence_number == self.seq {
                    match m.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            }
                        }
                        NetlinkPayload::InnerMessage(i) => out.push(i),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    /// Creates what `message` describes; one that exists already is left as it is.
    fn create(&mut self, message: RouteNetlinkMessage) -> io::Result<()> {
        match self.request(message, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Deletes what `message` describes; the kernel's answers in `missing` (it is not there)
    /// are no error.
    fn remove(&mut self, message: RouteNetlinkMessage, missing: &[Errno]) -> io::Result<()> {
        match self.request(message, NLM_F_ACK) {
            Err(e) if missing.iter().any(|m| e.raw_os_error() == Some(*m as i32)) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// The link named `name`, or `None`.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        self.get_link(msg)
    }

    /// The link of index `index`, or `None`.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg)
    }

    fn get_link(&mut self, msg: LinkMessage) -> io::Result<Option<Link>> {
        match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(answers) => Ok(answers.into_iter().find_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(Link {
                    index: l.header.index,
                    mac: l
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            LinkAttribute::Address(b) => Some(mac_string(b)),
                            _ => None,
                        })
                        .unwrap_or_default(),
                    peer: l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Link(i) => Some(*i),
                        _ => None,
                    }),
                    master: l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Controller(i) => Some(*i),
                        _ => None,
                    }),
                }),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc_enodev()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair: `name` here, `peer` in the namespace `peer_netns` (a file
    /// descriptor of it), both with `mtu` and, when not 0, `tx_queue_len`.
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: RawFd,
        mtu: u32,
        tx_queue_len: u32,
    ) -> io::Result<()> {
        let mut common = vec![LinkAttribute::Mtu(mtu)];
        if tx_queue_len > 0 {
            common.push(LinkAttribute::TxQueueLen(tx_queue_len));
        }
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes.push(LinkAttribute::IfName(peer.into()));
        peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_netns));
        peer_msg.attributes.extend(common.iter().cloned());
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.extend(common);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    /// Sets the link up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)
            .map(|_| ())
    }

    /// Sets the link's MAC address (taking it down and up again around the change).
    pub fn set_mac(&mut self, index: u32, mac: &[u8]) -> io::Result<()> {
        let mut down = LinkMessage::default();
        down.header.index = index;
        down.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(down), NLM_F_ACK)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
        self.set_up(index)
    }

    /// Adds `ip` as a host address (`/32` or `/128`) to the link `index`; one it has already is
    /// no error.
    pub fn add_address(&mut self, index: u32, ip: IpAddr) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(ip);
        msg.header.prefix_len = if ip.is_ipv4() { 32 } else { 128 };
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        self.create(RouteNetlinkMessage::NewAddress(msg))
    }

    /// Deletes the link (a veth takes its peer with it).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK)
            .map(|_| ())
    }

    /// Adds a route to its table; one that exists already is left as it is.
    pub fn add_route(&mut self, r: &RouteSpec) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        let addr = route_address;
        msg.header = RouteHeader {
            address_family: family_of(r.dst.addr()),
            destination_prefix_length: r.dst.prefix_len(),
            table: header_table(r.table),
            protocol: RouteProtocol::Boot,
            scope: if r.via.is_some() {
                RouteScope::Universe
            } else {
                RouteScope::Link
            },
            kind: RouteType::Unicast,
            ..Default::default()
        };
        msg.attributes
            .push(RouteAttribute::Destination(addr(r.dst.network())));
        if let Some(gw) = r.via {
            msg.attributes.push(RouteAttribute::Gateway(addr(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(r.oif));
        msg.attributes.push(RouteAttribute::Table(r.table));
        if let Some(src) = r.src {
            msg.attributes.push(RouteAttribute::PrefSource(addr(src)));
        }
        self.create(RouteNetlinkMessage::NewRoute(msg))
    }

    /// The routes of the main table: (destination, outgoing interface).
    pub fn routes(&mut self) -> io::Result<Vec<(ipnet::IpNet, Option<u32>)>> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter(|r| r.table == MAIN_TABLE)
            .map(|r| (r.dst, r.oif))
            .collect())
    }

    /// A permanent neighbour entry: `ip` at `mac` on the link `index` (one there is replaced).
    pub fn set_neighbour(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> io::Result<()> {
        let mut msg = neighbour_message(index, ip);
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// Deletes the neighbour entry of `ip` on the link `index`; a missing one is no error.
    pub fn delete_neighbour(&mut self, index: u32, ip: IpAddr) -> io::Result<()> {
        self.remove(
            RouteNetlinkMessage::DelNeighbour(neighbour_message(index, ip)),
            &[Errno::ENOENT, Errno::ENODEV],
        )
    }

    /// Deletes a route as listed; a missing one is no error.
    pub fn delete_route(&mut self, r: &Route) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            address_family: family_of(r.dst.addr()),
            destination_prefix_length: r.dst.prefix_len(),
            table: header_table(r.table),
            scope: RouteScope::NoWhere,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        msg.attributes
            .push(RouteAttribute::Destination(route_address(r.dst.network())));
        msg.attributes.push(RouteAttribute::Table(r.table));
        if let Some(oif) = r.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(gw) = r.via {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(gw)));
        }
        self.remove(RouteNetlinkMessage::DelRoute(msg), &[Errno::ESRCH])
    }

    /// Adds the rule `from SRC lookup TABLE pref PRIORITY`; one that exists is left as it is.
    pub fn add_source_rule(
        &mut self,
        src: ipnet::IpNet,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        self.create(RouteNetlinkMessage::NewRule(rule_message(
            Selector::From(src),
            table,
            priority,
        )))
    }

    /// Adds the rule `to DST lookup TABLE pref PRIORITY`; one that exists is left as it is.
    pub fn add_rule(&mut self, dst: ipnet::IpNet, table: u32, priority: u32) -> io::Result<()> {
        self.create(RouteNetlinkMessage::NewRule(rule_message(
            Selector::To(dst),
            table,
            priority,
        )))
    }

    /// Deletes the rule `from SRC lookup TABLE pref PRIORITY`; a missing one is no error.
    pub fn delete_source_rule(
        &mut self,
        src: ipnet::IpNet,
        table: u32,
        priority: u32,
    ) -> io::Result<()> {
        self.remove(
            RouteNetlinkMessage::DelRule(rule_message(Selector::From(src), table, priority)),
            &[Errno::ENOENT],
        )
    }

    /// Deletes the rule `to DST lookup TABLE pref PRIORITY`; a missing one is no error.
    pub fn delete_rule(&mut self, dst: ipnet::IpNet, table: u32, priority: u32) -> io::Result<()> {
        self.remove(
            RouteNetlinkMessage::DelRule(rule_message(Selector::To(dst), table, priority)),
            &[Errno::ENOENT],
        )
    }

    /// The permanent neighbour entries of the link `index`: the addresses.
    pub fn permanent_neighbours(&mut self, index: u32) -> io::Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = NeighbourMessage::default();
            msg.header.family = family;
            for a in self.request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewNeighbour(n) = a else {
                    continue;
                };
                if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
                    continue;
                }
                out.extend(n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                        Some(IpAddr::V4(*v))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                        Some(IpAddr::V6(*v))
                    }
                    _ => None,
                }));
            }
        }
        Ok(out)
    }

    /// The rules with a destination: (destination, table, priority).
    pub fn destination_rules(&mut self) -> io::Result<Vec<(ipnet::IpNet, u32, u32)>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RuleMessage::default();
            msg.header.family = family;
            for a in self.request(RouteNetlinkMessage::GetRule(msg), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRule(r) = a else {
                    continue;
                };
                let mut dst = None;
                let mut table = u32::from(r.header.table);
                let mut priority = 0;
                for a in &r.attributes {
                    match a {
                        RuleAttribute::Destination(ip) => {
                            dst = ipnet::IpNet::new(*ip, r.header.dst_len).ok()
                        }
                        RuleAttribute::Table(t) => table = *t,
                        RuleAttribute::Priority(p) => priority = *p,
                        _ => {}
                    }
                }
                if let Some(d) = dst {
                    out.push((d, table, priority));
                }
            }
        }
        Ok(out)
    }

    /// The routes of every table.
    pub fn all_routes(&mut self) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            for a in self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRoute(r) = a else {
                    continue;
                };
                let len = r.header.destination_prefix_length;
                let mut dst = None;
                let mut oif = None;
                let mut via = None;
                let mut src = None;
                let mut table = u32::from(r.header.table);
                let ip = |a: &RouteAddress| match a {
                    RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
                    RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
                    _ => None,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Gateway(g) => via = ip(g),
                        RouteAttribute::PrefSource(p) => src = ip(p),
                        RouteAttribute::Destination(RouteAddress::Inet(v)) => {
                            dst = ipnet::IpNet::new(IpAddr::V4(*v), len).ok()
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(v)) => {
                            dst = ipnet::IpNet::new(IpAddr::V6(*v), len).ok()
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let dst = dst.or_else(|| {
                    let any = if family == AddressFamily::Inet {
                        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                    } else {
                        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                    };
                    ipnet::IpNet::new(any, 0).ok()
                });
                if let Some(dst) = dst {
                    out.push(Route {
                        dst,
                        oif,
                        table,
                        via,
                        src,
                        unicast: r.header.kind == RouteType::Unicast,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The global (universe-scope) addresses of this namespace: (address, interface index).
    pub fn global_addresses(&mut self) -> io::Result<Vec<(IpAddr, u32)>> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewAddress(m) if m.header.scope == AddressScope::Universe => {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some((*ip, m.header.index)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }
}

fn neighbour_message(index: u32, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family_of(ip);
    msg.header.ifindex = index;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    msg
}

/// What a rule matches.
enum Selector {
    /// `to NET`.
    To(ipnet::IpNet),
    /// `from NET`.
    From(ipnet::IpNet),
}

fn rule_message(selector: Selector, table: u32, priority: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    let net = match selector {
        Selector::To(n) => {
            msg.header.dst_len = n.prefix_len();
            msg.attributes.push(RuleAttribute::Destination(n.network()));
            n
        }
        Selector::From(n) => {
            msg.header.src_len = n.prefix_len();
            msg.attributes.push(RuleAttribute::Source(n.network()));
            n
        }
    };
    msg.header.family = family_of(net.addr());
    msg.header.table = header_table(table);
    msg.header.action = RuleAction::ToTable;
    msg.attributes.push(RuleAttribute::Table(table));
    msg.attributes.push(RuleAttribute::Priority(priority));
    msg
}

/// `ENODEV`, the answer for a link that does not exist.
fn libc_enodev() -> i32 {
    Errno::ENODEV as i32
}
