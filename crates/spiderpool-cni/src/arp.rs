//! ARP on the pod's interface, for the coordinator's safety checks on a shared L2 segment: a
//! probe (RFC 5227: sender address 0.0.0.0) finds another host already using the pod's IPv4
//! address; a request to the gateway tells whether it answers; a gratuitous ARP announces the
//! pod's address after ADD. For IPv6 the same with NDP (RFC 4861/4862): a neighbour
//! solicitation from `::` to the address's solicited-node group (as duplicate address
//! detection does) finds another host by its advertisement, a solicitation to the gateway tells
//! whether it answers, and an unsolicited advertisement (override set) to all nodes announces
//! the address. Raw frames through `pnet_datalink` (an `AF_PACKET` socket of the calling
//! thread's network namespace).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender, MacAddr};
use pnet_packet::arp::{
    ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket, MutableArpPacket,
};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet_packet::icmpv6::Icmpv6Packet;
use pnet_packet::{MutablePacket, Packet};

/// One interface's raw ARP channel.
pub struct Arp {
    mac: MacAddr,
    tx: Box<dyn DataLinkSender>,
    rx: Box<dyn DataLinkReceiver>,
}

const FRAME: usize = 14 + 28;

impl Arp {
    /// A channel on the interface `name` of the current network namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}"))
            })?;
        let mac = iface
            .mac
            .ok_or_else(|| io::Error::other(format!("{name} has no MAC address")))?;
        let config = Config {
            read_timeout: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        match pnet_datalink::channel(&iface, config)? {
            Channel::Ethernet(tx, rx) => Ok(Arp { mac, tx, rx }),
            _ => Err(io::Error::other(format!("{name}: not an Ethernet channel"))),
        }
    }

    fn send(
        &mut self,
        op: ArpOperation,
        sender: Ipv4Addr,
        target_mac: MacAddr,
        target: Ipv4Addr,
    ) -> io::Result<()> {
        let mut buf = [0u8; FRAME];
        {
            let mut eth = MutableEthernetPacket::new(&mut buf).expect("frame size");
            eth.set_destination(MacAddr::broadcast());
            eth.set_source(self.mac);
            eth.set_ethertype(EtherTypes::Arp);
            let mut arp = MutableArpPacket::new(eth.payload_mut()).expect("frame size");
            arp.set_hardware_type(ArpHardwareTypes::Ethernet);
            arp.set_protocol_type(EtherTypes::Ipv4);
            arp.set_hw_addr_len(6);
            arp.set_proto_addr_len(4);
            arp.set_operation(op);
            arp.set_sender_hw_addr(self.mac);
            arp.set_sender_proto_addr(sender);
            arp.set_target_hw_addr(target_mac);
            arp.set_target_proto_addr(target);
        }
        self.tx
            .send_to(&buf, None)
            .unwrap_or_else(|| Err(io::Error::other("the channel sent nothing")))
    }

    /// Sends requests for `target` from `sender` (0.0.0.0: a probe) `tries` times, `wait` apart,
    /// and returns the MAC of the first host that answers for `target`, if any does.
    pub fn ask(
        &mut self,
        sender: Ipv4Addr,
        target: Ipv4Addr,
        tries: u32,
        wait: Duration,
    ) -> io::Result<Option<MacAddr>> {
        let own = self.mac;
        for _ in 0..tries {
            self.send(ArpOperations::Request, sender, MacAddr::zero(), target)?;
            let found = self.watch(wait, |frame| {
                let eth = EthernetPacket::new(frame)?;
                if eth.get_ethertype() != EtherTypes::Arp {
                    return None;
                }
                let arp = ArpPacket::new(eth.payload())?;
                // Someone else holding (or claiming) the address speaks for it.
                (arp.get_sender_proto_addr() == target && arp.get_sender_hw_addr() != own)
                    .then(|| arp.get_sender_hw_addr())
            })?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Reads frames for `wait`, until `f` finds what it looks for in one.
    fn watch<T>(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(&[u8]) -> Option<T>,
    ) -> io::Result<Option<T>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.rx.next() {
                Ok(frame) => {
                    if let Some(t) = f(frame) {
                        return Ok(Some(t));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// A gratuitous ARP: `ip` announced by this interface, so neighbours update their caches.
    pub fn announce(&mut self, ip: Ipv4Addr) -> io::Result<()> {
        self.send(ArpOperations::Request, ip, MacAddr::zero(), ip)
    }

    /// Sends one ICMPv6 message (`icmp`, its checksum left 0) from `src` to `dst` (MAC `to`).
    fn send6(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        to: MacAddr,
        mut icmp: Vec<u8>,
    ) -> io::Result<()> {
        let sum = Icmpv6Packet::new(&icmp)
            .map(|p| pnet_packet::icmpv6::checksum(&p, &src, &dst))
            .ok_or_else(|| io::Error::other("ICMPv6 message too short"))?;
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
        frame.extend_from_slice(&to.octets());
        frame.extend_from_slice(&self.mac.octets());
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        // IPv6: version 6, payload length, next header ICMPv6, hop limit 255 (NDP's).
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[58, 255]);
        frame.extend_from_slice(&src.octets());
        frame.extend_from_slice(&dst.octets());
        frame.extend_from_slice(&icmp);
        self.tx
            .send_to(&frame, None)
            .unwrap_or_else(|| Err(io::Error::other("the channel sent nothing")))
    }

    /// Sends neighbour solicitations for `target` from `sender` (`::`: a probe, as duplicate
    /// address detection) `tries` times, `wait` apart, and returns the MAC of the first other
    /// host that advertises `target`, if any does.
    pub fn ask6(
        &mut self,
        sender: Ipv6Addr,
        target: Ipv6Addr,
        tries: u32,
        wait: Duration,
    ) -> io::Result<Option<MacAddr>> {
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        let group_mac = MacAddr::new(0x33, 0x33, 0xff, t[13], t[14], t[15]);
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&t);
        if !sender.is_unspecified() {
            // Source link-layer address (not allowed from `::`).
            ns.extend_from_slice(&[1, 1]);
            ns.extend_from_slice(&self.mac.octets());
        }
        let own = self.mac;
        for _ in 0..tries {
            self.send6(sender, group, group_mac, ns.clone())?;
            let found = self.watch(wait, |frame| advertiser(frame, &t, own))?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// An unsolicited neighbour advertisement (override set) of `ip` to all nodes.
    pub fn announce6(&mut self, ip: Ipv6Addr) -> io::Result<()> {
        // Flags: override; then the target and its link-layer address.
        let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        na.extend_from_slice(&ip.octets());
        na.extend_from_slice(&[2, 1]);
        na.extend_from_slice(&self.mac.octets());
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        self.send6(ip, all_nodes, MacAddr::new(0x33, 0x33, 0, 0, 0, 1), na)
    }
}

/// The MAC of another host's neighbour advertisement for `target` in `frame` (its target
/// link-layer address option, else the frame's source), if the frame is one.
fn advertiser(frame: &[u8], target: &[u8; 16], own: MacAddr) -> Option<MacAddr> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Ipv6 || eth.get_source() == own {
        return None;
    }
    let ip = eth.payload();
    // Next header ICMPv6, then type 136 for the target.
    if ip.len() < 40 + 24 || ip[6] != 58 || ip[40] != 136 || ip[48..64] != target[..] {
        return None;
    }
    let mut opts = &ip[64..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if opts[0] == 2 {
            return Some(MacAddr::new(
                opts[2], opts[3], opts[4], opts[5], opts[6], opts[7],
            ));
        }
        opts = &opts[len..];
    }
    Some(eth.get_source())
}
