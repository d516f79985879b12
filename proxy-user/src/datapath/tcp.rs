//! TCP socket facts the sockmap tier needs and no safe wrapper exposes.
#![expect(unsafe_code, reason = "getsockopt(TCP_INFO) and ioctl(SIOCOUTQ) have no safe wrapper")]

use std::io;
use std::os::fd::{AsFd, AsRawFd as _};

fn info(socket: &impl AsFd) -> io::Result<libc::tcp_info> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).expect("tcp_info size fits");
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and partly written by the kernel: every bit pattern is a valid tcp_info.
    Ok(unsafe { info.assume_init() })
}

/// Payload bytes `socket` has received in order over its life (`tcpi_bytes_received`).
pub fn bytes_received(socket: &impl AsFd) -> io::Result<u64> {
    Ok(info(socket)?.tcpi_bytes_received)
}

/// Bytes received but not yet read (`SIOCINQ`); meaningful for a socket outside the sockmap.
pub fn receive_queue(socket: &impl AsFd) -> io::Result<u64> {
    queue_len(socket, libc::FIONREAD)
}

/// How far a socket's sending has got, over its life.
#[derive(Clone, Copy, Debug, Default)]
pub struct SendProgress {
    /// Payload bytes its far end acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Bytes written into its send queue: acknowledged plus still queued (`SIOCOUTQ`).
    pub entered: u64,
}

/// Reads [`SendProgress`]: `TCP_INFO` first, then the queue. Bytes acknowledged between the two reads
/// are then counted in neither, so `entered` never exceeds what had entered by the time it returns.
/// (In the other order they count in both: `entered` ran ahead of the truth while acknowledgements
/// flowed, and a FIN could be sent before bytes still on their way to the queue.)
pub fn send_progress(socket: &impl AsFd) -> io::Result<SendProgress> {
    let acked = info(socket)?.tcpi_bytes_acked;
    let queued = queue_len(socket, libc::TIOCOUTQ)?;
    Ok(SendProgress { acked, entered: acked + queued })
}

/// One of the socket's queue lengths: `SIOCINQ` (= `FIONREAD`) or `SIOCOUTQ` (= `TIOCOUTQ`).
fn queue_len(socket: &impl AsFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: both requests write one int to the pointer.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), request, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Sets `SO_SNDBUFFORCE` (the kernel doubles it; root may exceed `wmem_max`) and checks what it got.
pub fn force_send_buffer(socket: &impl AsFd, bytes: u64) -> io::Result<()> {
    let want = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fd = socket.as_fd().as_raw_fd();
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int size fits");
    // SAFETY: passes a pointer to one int of `len` bytes.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, (&raw const want).cast(), len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let got = socket2::SockRef::from(socket).send_buffer_size()?;
    if (got as u64) < bytes {
        return Err(io::Error::other(format!("send buffer is {got} bytes, below the {bytes} asked for")));
    }
    Ok(())
}
