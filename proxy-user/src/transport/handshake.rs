//! The TLS handshake of an agent link: rustls's unbuffered connection driven over the socket by a
//! deadline; then the same connection carries the records in user space ([`UserTls`]), or its traffic
//! secrets go to the kernel ([`Ktls`]).
//!
//! The handshake reads one record at a time (a header, then the rest of its record), so that when it
//! ends nothing past it was read: the kernel can take the connection over at that record boundary.

use std::io;
use std::sync::Arc;

use rustls::HandshakeKind;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ktls::{self, InstallError, KERNEL_SUITE, KernelTls, Ktls};
use super::role::{Role, invalid, tls_error};
use super::secured::Secured;
use super::tls::{HandshakeError, Peer};
use super::user_tls::{HEADER, MAX_RECORD, UserTls};

/// The largest handshake flight the driver buffers.
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// Whether the handshake was full or resumed.
pub type Kind = Option<HandshakeKind>;

/// Runs the client side of a handshake on `tcp` by `deadline`. With `kernel`, a connection of
/// [`KERNEL_SUITE`] goes to kernel TLS.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
    deadline: Instant,
    kernel: Option<KernelTls>,
) -> Result<(Secured<ClientConnectionData>, Kind), HandshakeError> {
    let failed = |e: rustls::Error| HandshakeError::Failed(tls_error(e));
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(failed)?;
    let flight = drive::<ClientConnectionData>(&mut conn, &mut tcp, deadline).await?;
    let kind = conn.handshake_kind();
    Ok((secure::<ClientConnectionData>(tcp, conn, flight, kernel)?, kind))
}

/// Accepts a handshake on `tcp` by `deadline`. With `kernel`, a connection of [`KERNEL_SUITE`] (the
/// agent offers only that suite when it wants kernel TLS) goes to kernel TLS.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
    deadline: Instant,
    kernel: Option<KernelTls>,
) -> Result<(Secured<ServerConnectionData>, Kind), HandshakeError> {
    let failed = |e: rustls::Error| HandshakeError::Failed(tls_error(e));
    let mut conn = UnbufferedServerConnection::new(config).map_err(failed)?;
    let flight = drive::<ServerConnectionData>(&mut conn, &mut tcp, deadline).await?;
    let kind = conn.handshake_kind();
    Ok((secure::<ServerConnectionData>(tcp, conn, flight, kernel)?, kind))
}

/// The connection after its handshake: kernel TLS where it is offered and the suite is the kernel's,
/// rustls in user space otherwise. rustls's connection itself goes on carrying a user-space link; only
/// kernel TLS takes its secrets out of it.
fn secure<D: Role>(
    tcp: TcpStream,
    conn: D::Conn,
    flight: Leftover,
    kernel: Option<KernelTls>,
) -> Result<Secured<D>, HandshakeError> {
    let peer = Peer::of(conn.peer_certificates());
    let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
    let empty = flight.records.is_empty() && flight.plaintext.is_empty();
    if kernel.is_some_and(|k| suite == Some(KERNEL_SUITE) && empty && k.usable()) {
        let (secrets, kernel_conn) =
            D::into_kernel(conn).map_err(|e| HandshakeError::Failed(tls_error(e)))?;
        return match ktls::install(&tcp, &secrets) {
            Ok(()) => Ok(Secured::Kernel(Ktls::new(tcp, kernel_conn, peer))),
            // The secrets are out of rustls: this connection cannot go on in user space. Later ones do.
            Err(InstallError::Broken(e)) => Err(HandshakeError::Failed(e)),
            Err(InstallError::Untouched(error)) => {
                KernelTls::refused(&error);
                Err(HandshakeError::Failed(error))
            }
        };
    }
    Ok(Secured::User(UserTls::new(tcp, conn, &flight.records, flight.plaintext, peer)))
}

/// What came after the handshake: records received but not processed, and application bytes rustls
/// already opened.
#[derive(Debug, Default)]
pub(super) struct Leftover {
    pub(super) records: Vec<u8>,
    pub(super) plaintext: Vec<u8>,
}

/// Drives an unbuffered connection through its handshake by `deadline`: encodes and sends its flights,
/// reads the peer's, until it may send application data with the handshake complete. Returns what
/// arrived beyond the handshake.
async fn drive<D: Role>(
    conn: &mut D::Conn,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<Leftover, HandshakeError> {
    let mut incoming = vec![0u8; MAX_RECORD];
    let mut used = 0usize;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut scratch = vec![0u8; 4096];
    let mut plaintext = Vec::new();
    let io = |e: io::Error| HandshakeError::Failed(e);
    loop {
        let (mut discard, step) = {
            let UnbufferedStatus { discard, state } = D::process(conn, &mut incoming[..used]);
            let step = match state.map_err(|e| HandshakeError::Failed(tls_error(e)))? {
                ConnectionState::EncodeTlsData(mut data) => loop {
                    match data.encode(&mut scratch) {
                        Ok(n) => {
                            outgoing.extend_from_slice(&scratch[..n]);
                            break Step::Again(0);
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                            scratch.resize(required_size, 0);
                        }
                        Err(e) => return Err(HandshakeError::Failed(invalid(e.to_string()))),
                    }
                },
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    Step::Send
                }
                ConnectionState::BlockedHandshake => Step::Read,
                ConnectionState::ReadTraffic(mut traffic) => {
                    let mut extra = 0;
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| HandshakeError::Failed(tls_error(e)))?;
                        plaintext.extend_from_slice(record.payload);
                        extra += record.discard;
                    }
                    Step::Again(extra)
                }
                ConnectionState::WriteTraffic(_) => Step::Writable,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io(io::ErrorKind::UnexpectedEof.into()));
                }
                _ => return Err(io(invalid("unexpected TLS state in the handshake"))),
            };
            (discard, step)
        };
        if let Step::Again(extra) = step {
            discard += extra;
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        let read = match step {
            Step::Again(_) => false,
            Step::Send => {
                tokio::time::timeout_at(deadline, tcp.write_all(&outgoing))
                    .await
                    .map_err(|_| HandshakeError::Timeout)?
                    .map_err(io)?;
                outgoing.clear();
                false
            }
            Step::Writable if !conn.is_handshaking() => {
                incoming.truncate(used);
                return Ok(Leftover { records: incoming, plaintext });
            }
            // A server may send before the client's Finished; the handshake is complete only then.
            Step::Writable | Step::Read => true,
        };
        if read {
            let want = to_record_end(&incoming[..used]);
            if used + want > incoming.len() {
                if used + want > MAX_HANDSHAKE_BYTES {
                    return Err(io(invalid("handshake flight too large")));
                }
                incoming.resize((incoming.len() * 2).clamp(used + want, MAX_HANDSHAKE_BYTES), 0);
            }
            let n = tokio::time::timeout_at(deadline, tcp.read(&mut incoming[used..used + want]))
                .await
                .map_err(|_| HandshakeError::Timeout)?
                .map_err(io)?;
            if n == 0 {
                return Err(io(io::ErrorKind::UnexpectedEof.into()));
            }
            used += n;
        }
    }
}

/// Bytes still missing from the first record in `have` that is not whole: the rest of its header, or of
/// its body once the header is there; the next header when every record is whole. Reading no more than
/// this never takes a byte past the handshake.
fn to_record_end(mut have: &[u8]) -> usize {
    loop {
        if have.len() < HEADER {
            return HEADER - have.len();
        }
        let whole = HEADER + usize::from(u16::from_be_bytes([have[3], have[4]]));
        if have.len() < whole {
            return whole - have.len();
        }
        have = &have[whole..];
    }
}

enum Step {
    /// Process again, after discarding this many more bytes.
    Again(usize),
    /// Send what was encoded.
    Send,
    /// Read more from the peer.
    Read,
    /// The connection may send application data.
    Writable,
}
