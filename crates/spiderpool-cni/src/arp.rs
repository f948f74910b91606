//! ARP on the pod's interface, for the coordinator's safety checks on a shared L2 segment: a
//! probe (RFC 5227: sender address 0.0.0.0) finds another host already using the pod's IPv4
//! address; a request to the gateway tells whether it answers; a gratuitous ARP announces the
//! pod's address after ADD. Raw frames through `pnet_datalink` (an `AF_PACKET` socket of the
//! calling thread's network namespace).

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender, MacAddr};
use pnet_packet::arp::{
    ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket, MutableArpPacket,
};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
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
        for _ in 0..tries {
            self.send(ArpOperations::Request, sender, MacAddr::zero(), target)?;
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                let frame = match self.rx.next() {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
                    Err(e) => return Err(e),
                };
                let Some(eth) = EthernetPacket::new(frame) else {
                    continue;
                };
                if eth.get_ethertype() != EtherTypes::Arp {
                    continue;
                }
                let Some(arp) = ArpPacket::new(eth.payload()) else {
                    continue;
                };
                // Someone else holding (or claiming) the address speaks for it.
                if arp.get_sender_proto_addr() == target && arp.get_sender_hw_addr() != self.mac {
                    return Ok(Some(arp.get_sender_hw_addr()));
                }
            }
        }
        Ok(None)
    }

    /// A gratuitous ARP: `ip` announced by this interface, so neighbours update their caches.
    pub fn announce(&mut self, ip: Ipv4Addr) -> io::Result<()> {
        self.send(ArpOperations::Request, ip, MacAddr::zero(), ip)
    }
}
