//! Spoke's wire messages between agent and server (docs/protocol.md describes the bytes).
//!
//! Every connection an agent opens to the server starts with one frame that says what it is: a
//! [`Message::Hello`] opens the control channel, a [`Message::DataHello`] parks a data connection in
//! the server's pool. A data connection then carries exactly one [`Message::Dial`] (server → agent) and
//! one [`Message::DialReply`] (agent → server); after a successful reply it carries raw stream bytes
//! until close. Control frames never travel on data connections.

use std::net::IpAddr;

use ipnet::IpNet;

/// Version of the wire format spoken by this build. A peer announcing another version is refused with
/// [`Message::Reject`].
pub const PROTOCOL_VERSION: u16 = 5;

/// Checks a peer's protocol version; `Err` holds the reason to send back in a `Reject`.
pub fn check_version(version: u16) -> Result<(), String> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!("unsupported protocol version {version}; this side speaks {PROTOCOL_VERSION}"))
    }
}

/// Names an agent's control session; a data connection quotes it to join the session. 128 bits from
/// the operating system's secure random source, so that it cannot be guessed. It is a credential: logs
/// show only its first 32 bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u128);

/// `N` bytes from the operating system's secure random source.
fn secure_random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's secure random source works");
    bytes
}

/// A fresh [`Message::Challenge`] nonce from the secure random source.
#[must_use]
pub fn new_nonce() -> [u8; NONCE_LEN] {
    secure_random()
}

impl SessionId {
    /// A fresh id from the secure random source.
    #[must_use]
    pub fn random() -> Self {
        Self(u128::from_be_bytes(secure_random()))
    }

    /// The first 32 bits in hex: enough to tell sessions apart in logs, too few to join one.
    #[must_use]
    pub fn label(self) -> String {
        format!("{:08x}", self.0 >> 96)
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({}…)", self.label())
    }
}

/// Bytes of a [`Message::Challenge`] nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Bytes of a session's data key.
pub const DATA_KEY_LEN: usize = 32;

/// The bytes of a session's data key, as `HelloAck` carries them (inside the control channel's TLS,
/// never elsewhere). `Debug` shows none of them.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBytes(pub [u8; DATA_KEY_LEN]);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(MASKED)")
    }
}

/// Wiped when dropped: the key leaves no copy behind in freed memory.
impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl KeyBytes {
    /// Overwrites the key with zeros (what dropping does).
    fn wipe(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }

    /// A fresh key from the operating system's secure random source.
    #[must_use]
    pub fn random() -> Self {
        let mut key = [0u8; DATA_KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .expect("the system's random source works");
        Self(key)
    }
}

/// A session's data key: the server draws it for each session and sends it to the agent in `HelloAck`,
/// inside the control channel's TLS, so it never crosses the wire in the clear. Plain data connections,
/// which carry no certificate, prove with it that they belong to the session, and the server signs
/// each `Dial` on them with it.
#[derive(Clone)]
pub struct DataKey(ring::hmac::Key);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(MASKED)")
    }
}

impl DataKey {
    /// The key from its bytes.
    #[must_use]
    pub fn new(bytes: &[u8; DATA_KEY_LEN]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes))
    }

    fn mac(&self, input: &[u8]) -> [u8; MAC_LEN] {
        ring::hmac::sign(&self.0, input).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    fn verify(&self, input: &[u8], mac: &[u8; MAC_LEN]) -> bool {
        ring::hmac::verify(&self.0, input, mac).is_ok()
    }

    fn proof_input(session: SessionId, nonces: &Nonces) -> Vec<u8> {
        [&b"data-connection"[..], &session.0.to_be_bytes(), &nonces.server, &nonces.agent].concat()
    }

    /// Every field of a dial, each of fixed length or length-prefixed, so no two dials share an input.
    fn dial_input(nonces: &Nonces, stream_id: u64, host: &str, port: u16, timeout_ms: u32) -> Vec<u8> {
        let host_len = u16::try_from(host.len()).unwrap_or(u16::MAX).to_be_bytes();
        [
            &b"dial"[..],
            &nonces.server,
            &nonces.agent,
            &stream_id.to_be_bytes(),
            &host_len,
            host.as_bytes(),
            &port.to_be_bytes(),
            &timeout_ms.to_be_bytes(),
        ]
        .concat()
    }

    /// What a plain data connection answers to join `session`, with the server's challenge and its own
    /// nonce.
    #[must_use]
    pub fn proof(&self, session: SessionId, nonces: &Nonces) -> [u8; MAC_LEN] {
        self.mac(&Self::proof_input(session, nonces))
    }

    /// Whether `mac` is [`DataKey::proof`] of `session` and `nonces` (compared in constant time).
    #[must_use]
    pub fn verify_proof(&self, session: SessionId, nonces: &Nonces, mac: &[u8; MAC_LEN]) -> bool {
        self.verify(&Self::proof_input(session, nonces), mac)
    }

    /// The MAC of a `Dial` on the plain data connection whose challenge exchanged `nonces`.
    #[must_use]
    pub fn dial_mac(
        &self,
        nonces: &Nonces,
        stream_id: u64,
        host: &str,
        port: u16,
        timeout_ms: u32,
    ) -> [u8; MAC_LEN] {
        self.mac(&Self::dial_input(nonces, stream_id, host, port, timeout_ms))
    }

    /// Whether `mac` is [`DataKey::dial_mac`] of this dial (compared in constant time).
    #[must_use]
    pub fn verify_dial(
        &self,
        nonces: &Nonces,
        (stream_id, host, port, timeout_ms): (u64, &str, u16, u32),
        mac: &[u8; MAC_LEN],
    ) -> bool {
        self.verify(&Self::dial_input(nonces, stream_id, host, port, timeout_ms), mac)
    }
}

/// The two nonces of a data connection's challenge: the server's (`Challenge`) and the agent's
/// (`DataProof`). Both sign the connection's `Dial`, so a `Challenge`, `Dial` and MAC recorded on an
/// earlier connection and replayed on a new one never verify: the agent's nonce is fresh each time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonces {
    /// The server's challenge.
    pub server: [u8; NONCE_LEN],
    /// The agent's answer.
    pub agent: [u8; NONCE_LEN],
}

impl Nonces {
    /// What signs the `Dial`s of a connection that answered no challenge: a TLS data connection with a
    /// node certificate, which TLS authenticates and keeps from replay. Its dials are signed all the
    /// same, so that nothing but the server can make the agent dial: not bytes of a stream read as a
    /// frame because a bug desynchronised the byte counts of a reused connection.
    pub const NONE: Self = Self { server: [0; NONCE_LEN], agent: [0; NONCE_LEN] };
}

/// The `Reject` reason for a `Hello` that reached a replica the agent holds a session with already
/// (through a load balancer).
pub const ALREADY_HELD: &str = "this replica holds a session with the agent already";

/// The `Reject` reason for a `Hello` whose agent id another live session holds (another process with
/// the same node's identity, or a new pod during a rollout before the old one drains): the agent stands
/// by and tries again.
pub const IDENTITY_HELD: &str = "another live session holds this agent's identity";

/// The `Reject` reason for a `Hello` that reached a server a successor process has replaced (it sent
/// `Moving`): the agent tries again at once, and reaches the successor.
pub const SUPERSEDED: &str = "a successor took this server's place: connect again";

/// The `Reject` reason for a `DataHello` whose session this server does not hold (expired, or another
/// replica's: the agent then replaces the connection at once).
pub const UNKNOWN_SESSION: &str = "unknown or expired session";

/// The `Reject` reason for a `DataHello` past the server's pool (`--max-parked-conns`): the agent
/// keeps the connections it has parked and tries for another after [`POOL_FULL_PAUSE`].
pub const SERVER_POOL_FULL: &str = "the server's pool of parked data connections is full";

/// The `Reject` reason on a parked data connection the server closes because its agent's pool went
/// unused (`--idle-pool-timeout`): the agent keeps the ones it still has parked, and grows its pool
/// again as dials take them.
pub const PARK_SURPLUS: &str = "not needed: an idle agent keeps fewer parked data connections";

/// How long an agent waits before it offers another data connection to a server whose pool is full.
pub const POOL_FULL_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest frame body (type byte and payload) either side accepts.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Longest string field (identifiers, host names, reasons).
pub const MAX_STRING_LEN: usize = 1024;
/// Longest bearer token (`Hello::token`); projected service-account tokens are 1 to 2 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Most entries in one list field (host names, addresses, CIDRs).
pub const MAX_LIST_LEN: usize = 256;

/// A credential: never logged (`Debug` shows its length only).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    /// The credential itself.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What the agent says about itself when it opens its control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Unique name of the agent (usually the node name).
    pub agent_id: String,
    /// Kubernetes node name the agent runs on.
    pub node_name: String,
    /// Host names the node answers to (exact match, case-insensitive).
    pub hostnames: Vec<String>,
    /// The node's own addresses (exact match).
    pub addresses: Vec<IpAddr>,
    /// Networks the agent serves beyond its own addresses (pod CIDR, service CIDR), for longest-prefix routing.
    pub cidrs: Vec<IpNet>,
    /// Whether this agent takes destinations no other agent claims (`defaultRoute` strategy).
    pub default_route: bool,
}

/// Why a dial did not produce a stream; carried in [`Message::DialReply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DialStatus {
    /// Connected; raw bytes follow.
    Ok = 0,
    /// The agent's policy does not allow this destination.
    Denied = 1,
    /// The destination refused the connection.
    Refused = 2,
    /// The destination did not answer within the dial timeout.
    Timeout = 3,
    /// Any other dial failure (unreachable network, reset, ...).
    Failed = 4,
    /// The destination host name did not resolve.
    Unresolved = 5,
    /// The agent is draining and takes no new streams.
    Draining = 6,
    /// The agent holds as many streams as its `--max-streams` allows; nothing was dialed.
    Busy = 7,
}

impl DialStatus {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::Denied,
            2 => Self::Refused,
            3 => Self::Timeout,
            4 => Self::Failed,
            5 => Self::Unresolved,
            6 => Self::Draining,
            7 => Self::Busy,
            _ => return None,
        })
    }

    /// Short stable name, used as a metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
            Self::Unresolved => "unresolved",
            Self::Draining => "draining",
            Self::Busy => "busy",
        }
    }
}

/// One frame's meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Agent → server, first frame of the control channel.
    Hello {
        /// Wire format version the agent speaks.
        version: u16,
        /// Who the agent is and what it serves.
        identity: Identity,
        /// A service-account token proving the agent's node (`--agent-auth token`); empty otherwise.
        token: Secret,
        /// The server replicas (ids) the agent holds a session with already: a replica among them
        /// answers [`ALREADY_HELD`] and keeps the agent's session it has, rather than replacing it.
        held: Vec<String>,
    },
    /// Server → agent, answer to `Hello`.
    HelloAck {
        /// Wire format version the server speaks.
        version: u16,
        /// Identifier of this server replica.
        server_id: String,
        /// How many server replicas the agent should keep a control channel to.
        server_count: u16,
        /// Names this control session; data connections quote it.
        session_id: SessionId,
        /// How often the agent must send `Ping` (milliseconds).
        heartbeat_ms: u32,
        /// `host:port` where this replica takes the session's data connections (its own address, where
        /// agents reach replicas through a load balancer); empty: where the control channel went.
        data_addr: String,
        /// The session's data key ([`DataKey`]).
        data_key: KeyBytes,
    },
    /// Server → agent on the control channel: the number of replicas changed.
    ServerCount {
        /// How many server replicas the agent should keep a control channel to.
        count: u16,
    },
    /// Either direction on the control channel: liveness probe.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Either direction on the control channel: the sender wrote the last byte of its direction of
    /// stream `stream_id` on the stream's data connection, `bytes` in all (after `DialReply`). The
    /// data connection itself stays open, so that it can carry another stream (docs/protocol.md).
    StreamEnd {
        /// The stream (`Dial::stream_id`).
        stream_id: u64,
        /// Bytes the sender wrote in its direction.
        bytes: u64,
    },
    /// Server → agent on the control channel: the server has read every byte the agent announced with
    /// `StreamEnd`; the agent may write on the stream's data connection again.
    StreamEndRead {
        /// The stream.
        stream_id: u64,
    },
    /// Agent → server: take no new streams through me; open streams go on.
    Drain,
    /// Server → agent: this server is going away; reconnect (to another replica) later.
    GoAway {
        /// Human-readable reason.
        reason: String,
    },
    /// Server → agent: a successor process has taken this server's place (a surge replacement); open
    /// a session to it now, through the same address, and keep this one until it ends (`GoAway`)
    /// for the streams still on it. This server takes no new connections from agents.
    Moving {
        /// Human-readable reason.
        reason: String,
    },
    /// Agent → server, first frame of a data connection.
    DataHello {
        /// Wire format version the agent speaks.
        version: u16,
        /// The agent's current control session (`HelloAck::session_id`).
        session_id: SessionId,
    },
    /// Server → agent on a plain data connection, answering `DataHello`: prove you hold the session's
    /// data key.
    Challenge {
        /// Fresh random bytes, different for every connection.
        nonce: [u8; NONCE_LEN],
    },
    /// Agent → server on a plain data connection, answering `Challenge`.
    DataProof {
        /// The agent's own fresh random bytes.
        nonce: [u8; NONCE_LEN],
        /// [`DataKey::proof`] of the session id, the challenge's nonce and `nonce`.
        mac: [u8; MAC_LEN],
    },
    /// Server → agent on a data connection: connect to this destination.
    Dial {
        /// Server-assigned stream identifier, for logs.
        stream_id: u64,
        /// Destination host: an IP address literal or a host name.
        host: String,
        /// Destination port.
        port: u16,
        /// How long the agent may try (milliseconds).
        timeout_ms: u32,
        /// [`DataKey::dial_mac`] of this dial and the connection's challenge [`Nonces`] ([`Nonces::NONE`]
        /// over TLS with a node certificate, where no challenge is made).
        mac: [u8; MAC_LEN],
    },
    /// Agent → server on a data connection: the dial's outcome.
    DialReply {
        /// The `Dial`'s stream id.
        stream_id: u64,
        /// Outcome.
        status: DialStatus,
        /// Detail for logs and the HTTP error body; empty on success.
        message: String,
    },
    /// Either side, before closing: the peer's first frame was refused.
    Reject {
        /// Why.
        reason: String,
    },
}

/// Frame type bytes (docs/protocol.md).
pub(crate) mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const SERVER_COUNT: u8 = 7;
    pub const PING: u8 = 3;
    pub const PONG: u8 = 4;
    pub const DRAIN: u8 = 5;
    pub const GO_AWAY: u8 = 6;
    pub const MOVING: u8 = 10;
    pub const STREAM_END: u8 = 8;
    pub const STREAM_END_READ: u8 = 9;
    pub const DATA_HELLO: u8 = 16;
    pub const CHALLENGE: u8 = 19;
    pub const DATA_PROOF: u8 = 20;
    pub const DIAL: u8 = 17;
    pub const DIAL_REPLY: u8 = 18;
    pub const REJECT: u8 = 127;
}

impl Message {
    /// The frame type byte of this message.
    #[must_use]
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => kind::HELLO,
            Self::HelloAck { .. } => kind::HELLO_ACK,
            Self::ServerCount { .. } => kind::SERVER_COUNT,
            Self::Ping { .. } => kind::PING,
            Self::Pong { .. } => kind::PONG,
            Self::StreamEnd { .. } => kind::STREAM_END,
            Self::StreamEndRead { .. } => kind::STREAM_END_READ,
            Self::Drain => kind::DRAIN,
            Self::GoAway { .. } => kind::GO_AWAY,
            Self::Moving { .. } => kind::MOVING,
            Self::DataHello { .. } => kind::DATA_HELLO,
            Self::Challenge { .. } => kind::CHALLENGE,
            Self::DataProof { .. } => kind::DATA_PROOF,
            Self::Dial { .. } => kind::DIAL,
            Self::DialReply { .. } => kind::DIAL_REPLY,
            Self::Reject { .. } => kind::REJECT,
        }
    }

    pub(crate) fn dial_status(v: u8) -> Option<DialStatus> {
        DialStatus::from_u8(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's data key is wiped when dropped (the copy `HelloAck` carried, on both sides).
    #[test]
    fn a_data_key_is_wiped() {
        let mut key = KeyBytes::random();
        assert_ne!(key.0, [0; DATA_KEY_LEN]);
        key.wipe();
        assert_eq!(key.0, [0; DATA_KEY_LEN]);
    }

    /// An on-path host that recorded a data connection's `Challenge`, `Dial` and MAC replays them on a
    /// new connection: the agent answers the old challenge with a fresh nonce of its own, so neither
    /// the recorded proof nor the recorded dial verifies there.
    #[test]
    fn a_challenge_and_dial_recorded_on_one_connection_do_not_verify_on_another() {
        let key = DataKey::new(&KeyBytes::random().0);
        let session = SessionId::random();
        let recorded = Nonces { server: new_nonce(), agent: new_nonce() };
        let dial = (7, "10.0.0.5", 10250, 5_000);
        let mac = key.dial_mac(&recorded, dial.0, dial.1, dial.2, dial.3);
        let proof = key.proof(session, &recorded);
        assert!(key.verify_dial(&recorded, dial, &mac));
        assert!(key.verify_proof(session, &recorded, &proof));

        let replayed = Nonces { agent: new_nonce(), ..recorded };
        assert!(!key.verify_dial(&replayed, dial, &mac), "a replayed dial verified");
        assert!(!key.verify_proof(session, &replayed, &proof), "a replayed proof verified");
        // Over TLS without a challenge the dial is signed too: bytes that happen to parse as a `Dial`
        // carry no MAC the agent accepts.
        assert!(!key.verify_dial(&Nonces::NONE, dial, &[0; MAC_LEN]));
        assert!(key.verify_dial(
            &Nonces::NONE,
            dial,
            &key.dial_mac(&Nonces::NONE, dial.0, dial.1, dial.2, dial.3)
        ));
        // Nor does a dial signed for another stream, host, port or timeout.
        for other in
            [(8, "10.0.0.5", 10250, 5_000), (7, "10.0.0.6", 10250, 5_000), (7, "10.0.0.5", 22, 5_000)]
        {
            assert!(!key.verify_dial(&recorded, other, &mac), "{other:?}");
        }
    }
}
