//! The TLS handshake of an agent link: rustls's unbuffered connection driven over the socket by a
//! deadline, then its traffic secrets handed to the kernel ([`Ktls`]) or to [`Records`].
//!
//! The handshake reads one record at a time (a header, then the rest of its record), so that when it
//! ends nothing past it was read: the kernel can take the connection over at that record boundary.

use std::io;
use std::sync::Arc;

use rustls::HandshakeKind;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ktls::{self, InstallError, KERNEL_SUITE, KernelTls, Ktls};
use super::records::{HEADER, MAX_RECORD, Records, Role, invalid, tls_error};
use super::secured::Secured;
use super::tls::{HandshakeError, peer_node};

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
    let flight = drive(&mut conn, &mut tcp, deadline).await?;
    let (kind, peer_node) = (conn.handshake_kind(), conn.peer_certificates().and_then(peer_node));
    let (secrets, kernel_conn) = conn.dangerous_into_kernel_connection().map_err(failed)?;
    Ok((secure(tcp, kernel_conn, secrets, flight, peer_node, kernel)?, kind))
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
    let flight = drive(&mut conn, &mut tcp, deadline).await?;
    let (kind, peer_node) = (conn.handshake_kind(), conn.peer_certificates().and_then(peer_node));
    let (secrets, kernel_conn) = conn.dangerous_into_kernel_connection().map_err(failed)?;
    Ok((secure(tcp, kernel_conn, secrets, flight, peer_node, kernel)?, kind))
}

/// The connection after its handshake: kernel TLS where it is offered and the suite is the kernel's,
/// user-space records otherwise (also where the kernel refused the keys before taking any).
fn secure<D: Role>(
    tcp: TcpStream,
    conn: KernelConnection<D>,
    secrets: rustls::ExtractedSecrets,
    flight: Leftover,
    peer_node: Option<String>,
    kernel: Option<KernelTls>,
) -> Result<Secured<D>, HandshakeError> {
    let suite = conn.negotiated_cipher_suite().suite();
    let empty = flight.records.is_empty() && flight.plaintext.is_empty();
    if kernel.is_some() && suite == KERNEL_SUITE && empty {
        match ktls::install(&tcp, &secrets) {
            Ok(()) => return Ok(Secured::Kernel(Ktls::new(tcp, conn, peer_node))),
            Err(InstallError::Broken(e)) => return Err(HandshakeError::Failed(e)),
            Err(InstallError::Untouched(error)) => {
                tracing::warn!(%error, "kernel TLS refused the keys: this connection's records stay in user space");
            }
        }
    }
    Records::new(tcp, conn, secrets, flight, peer_node).map(Secured::User).map_err(HandshakeError::Failed)
}

/// What came after the handshake: records received but not processed, and application bytes rustls
/// already opened.
#[derive(Debug, Default)]
pub(super) struct Leftover {
    pub(super) records: Vec<u8>,
    pub(super) plaintext: Vec<u8>,
}

/// Either side's unbuffered connection, for [`drive`].
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
}

/// Drives an unbuffered connection through its handshake by `deadline`: encodes and sends its flights,
/// reads the peer's, until it may send application data with the handshake complete. Returns what
/// arrived beyond the handshake.
async fn drive<C: Unbuffered>(
    conn: &mut C,
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
            let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..used]);
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
            Step::Writable if !conn.handshaking() => {
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
