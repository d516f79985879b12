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
pub const PROTOCOL_VERSION: u16 = 2;

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

impl SessionId {
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

/// Largest frame body (type byte and payload) either side accepts.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Longest string field (identifiers, host names, reasons).
pub const MAX_STRING_LEN: usize = 1024;
/// Most entries in one list field (host names, addresses, CIDRs).
pub const MAX_LIST_LEN: usize = 256;

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
    /// Agent → server: take no new streams through me; open streams go on.
    Drain,
    /// Server → agent: this server is going away; reconnect (to another replica) later.
    GoAway {
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
    pub const PING: u8 = 3;
    pub const PONG: u8 = 4;
    pub const DRAIN: u8 = 5;
    pub const GO_AWAY: u8 = 6;
    pub const DATA_HELLO: u8 = 16;
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
            Self::Ping { .. } => kind::PING,
            Self::Pong { .. } => kind::PONG,
            Self::Drain => kind::DRAIN,
            Self::GoAway { .. } => kind::GO_AWAY,
            Self::DataHello { .. } => kind::DATA_HELLO,
            Self::Dial { .. } => kind::DIAL,
            Self::DialReply { .. } => kind::DIAL_REPLY,
            Self::Reject { .. } => kind::REJECT,
        }
    }

    pub(crate) fn dial_status(v: u8) -> Option<DialStatus> {
        DialStatus::from_u8(v)
    }
}
