//! STUN message pieces the TURN tests share (`turn_core.rs` in memory, `turn_server.rs` over UDP).

use std::net::SocketAddr;
use stun::agent::TransactionId;
use stun::attributes::{AttrType, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{Getter, Message, MessageType, Setter};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

/// A client's coturn REST-API credentials, and the realm and nonce its challenge gave it.
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub realm: String,
    pub nonce: String,
}

impl Credentials {
    /// Credentials for `user` valid until `expiry` (Unix seconds), minted with `secret`.
    pub fn rest(user: &str, expiry: u64, secret: &str) -> Self {
        let username = format!("{expiry}:{user}");
        let password = avatar_relay::ice::rest_password(secret, &username);
        Self {
            username,
            password,
            realm: String::new(),
            nonce: String::new(),
        }
    }

    /// Take the realm and nonce of a 401 (or 438) answer.
    pub fn learn(&mut self, challenge: &Message) {
        self.nonce = TextAttribute::get_from_as(challenge, ATTR_NONCE).expect("nonce").text;
        self.realm = TextAttribute::get_from_as(challenge, ATTR_REALM).expect("realm").text;
    }

    /// A message of type `typ` with `attrs`; with `auth`, signed (long-term credentials).
    pub fn build(&self, typ: MessageType, attrs: Vec<Box<dyn Setter>>, auth: bool) -> Result<Message, stun::Error> {
        let mut setters: Vec<Box<dyn Setter>> = vec![Box::new(TransactionId::new()), Box::new(typ)];
        setters.extend(attrs);
        if auth {
            setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
            setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.username.clone(),
                self.realm.clone(),
                self.password.clone(),
            )));
        }
        let mut m = Message::new();
        m.build(&setters)?;
        Ok(m)
    }
}

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
