//! The side of an agent link (client: the agent; server: spoke-server) as the TLS code needs it, and
//! the errors TLS failures become.

use std::io;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{UnbufferedConnectionCommon, UnbufferedStatus};

pub(super) fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub(super) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Whether `e` is rustls refusing what the peer sent (a record or message that breaks TLS's rules, or a
/// flood its limits cut off), as opposed to the connection failing.
#[must_use]
pub fn is_tls_violation(e: &io::Error) -> bool {
    e.get_ref().is_some_and(<dyn std::error::Error + Send + Sync>::is::<rustls::Error>)
}

/// The side of a link: which unbuffered connection rustls keeps for it, and what it does with a
/// session ticket once the records are in the kernel ([`super::ktls`]).
pub trait Role: Sized + Send + Sync + Unpin + 'static {
    /// rustls's unbuffered connection of this side.
    type Conn: std::ops::Deref<Target = UnbufferedConnectionCommon<Self>> + Send + Sync + Unpin + 'static;

    /// Processes the records in `incoming` ([`UnbufferedConnectionCommon::process_tls_records`]).
    fn process<'c, 'i>(conn: &'c mut Self::Conn, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self>;

    /// Hands the connection's secrets over, for kernel TLS.
    fn into_kernel(
        conn: Self::Conn,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self>), rustls::Error>;

    /// Takes a `NewSessionTicket` message's body received on a kernel TLS connection.
    fn ticket(conn: &mut KernelConnection<Self>, body: &[u8]) -> Result<(), rustls::Error>;
}

impl Role for ClientConnectionData {
    type Conn = UnbufferedClientConnection;

    fn process<'c, 'i>(conn: &'c mut Self::Conn, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self> {
        conn.process_tls_records(incoming)
    }

    fn into_kernel(
        conn: Self::Conn,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self>), rustls::Error> {
        conn.dangerous_into_kernel_connection()
    }

    fn ticket(conn: &mut KernelConnection<Self>, body: &[u8]) -> Result<(), rustls::Error> {
        conn.handle_new_session_ticket(body)
    }
}

impl Role for ServerConnectionData {
    type Conn = UnbufferedServerConnection;

    fn process<'c, 'i>(conn: &'c mut Self::Conn, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self> {
        conn.process_tls_records(incoming)
    }

    fn into_kernel(
        conn: Self::Conn,
    ) -> Result<(rustls::ExtractedSecrets, KernelConnection<Self>), rustls::Error> {
        conn.dangerous_into_kernel_connection()
    }

    fn ticket(_: &mut KernelConnection<Self>, _: &[u8]) -> Result<(), rustls::Error> {
        Err(rustls::Error::General("a client sent a session ticket".into()))
    }
}
