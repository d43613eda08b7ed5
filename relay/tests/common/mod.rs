//! STUN message pieces the TURN tests share (`turn_core.rs` in memory, `turn_server.rs` over UDP).

use std::net::SocketAddr;
use stun::attributes::AttrType;
use stun::error_code::ErrorCodeAttribute;
use stun::message::{Getter, Message, Setter};
use stun::xoraddr::XorMappedAddress;

/// An attribute with any value, well-formed or not.
pub struct Raw(pub AttrType, pub Vec<u8>);

impl Setter for Raw {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(self.0, &self.1);
        Ok(())
    }
}

/// An address attribute XOR-encoded like XOR-MAPPED-ADDRESS (XOR-PEER-ADDRESS, …).
pub fn peer(attr: AttrType, addr: SocketAddr) -> Box<dyn Setter> {
    struct P(AttrType, SocketAddr);
    impl Setter for P {
        fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
            XorMappedAddress {
                ip: self.1.ip(),
                port: self.1.port(),
            }
            .add_to_as(m, self.0)
        }
    }
    Box::new(P(attr, addr))
}

/// The error code of an answer (`None` for a success).
pub fn code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|()| e.code.0)
}
