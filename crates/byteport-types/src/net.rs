//! The address plan of bridged networks: each project gets one /24 out of
//! `10.80.0.0/12`, the same on every node, chosen by the control plane
//! when the project is made (its network index). In it, `.1` is the
//! node's gateway (DHCP, DNS, the metadata address's way in), guests get
//! `.10` to `.250`.

use std::net::Ipv4Addr;

/// How many project networks the plan holds (a /12 in /24s).
pub const MAX_NETWORKS: u32 = 4096;

/// One project's network: a /24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    base: Ipv4Addr,
}

impl Subnet {
    /// The network of the project with this index (`None` past the plan).
    pub fn of_index(index: u32) -> Option<Subnet> {
        (index < MAX_NETWORKS).then(|| Subnet {
            base: Ipv4Addr::new(10, 80 + (index / 256) as u8, (index % 256) as u8, 0),
        })
    }

    /// Parses `a.b.c.0/24`.
    pub fn parse(cidr: &str) -> Option<Subnet> {
        let (addr, len) = cidr.split_once('/')?;
        let base: Ipv4Addr = addr.parse().ok()?;
        (len == "24" && base.octets()[3] == 0).then_some(Subnet { base })
    }

    pub fn cidr(&self) -> String {
        format!("{}/24", self.base)
    }

    /// The `.N` address in it.
    pub fn host(&self, n: u8) -> Ipv4Addr {
        let o = self.base.octets();
        Ipv4Addr::new(o[0], o[1], o[2], n)
    }

    /// The node's own address in it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// The first and last address handed to guests.
    pub fn guest_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (self.host(10), self.host(250))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        a.octets()[..3] == self.base.octets()[..3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_map_to_distinct_slash_24s_and_back() {
        let a = Subnet::of_index(0).unwrap();
        assert_eq!(a.cidr(), "10.80.0.0/24");
        assert_eq!(a.gateway().to_string(), "10.80.0.1");
        let b = Subnet::of_index(257).unwrap();
        assert_eq!(b.cidr(), "10.81.1.0/24");
        assert_eq!(Subnet::of_index(4095).unwrap().cidr(), "10.95.255.0/24");
        assert_eq!(Subnet::of_index(4096), None);
        assert_eq!(Subnet::parse(&b.cidr()), Some(b));
        assert_eq!(Subnet::parse("10.81.1.7/24"), None);
        assert!(b.contains("10.81.1.200".parse().unwrap()));
        assert!(!b.contains("10.81.2.200".parse().unwrap()));
    }
}
