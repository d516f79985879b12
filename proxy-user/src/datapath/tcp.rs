//! TCP socket facts the sockmap tier needs and no safe wrapper exposes.
#![expect(unsafe_code, reason = "getsockopt(TCP_INFO) and ioctl(SIOCOUTQ) have no safe wrapper")]

use std::io;
use std::os::fd::{AsFd, AsRawFd as _};

/// Payload bytes the far end of `socket` has acknowledged (`tcpi_bytes_acked`).
pub fn bytes_acked(socket: &impl AsFd) -> io::Result<u64> {
    Ok(info(socket)?.tcpi_bytes_acked)
}

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
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ (= FIONREAD) writes one int to the pointer.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::FIONREAD, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Bytes in the send queue of `socket` not yet acknowledged (`SIOCOUTQ`).
pub fn send_queue(socket: &impl AsFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int to the pointer.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Bytes written into `socket` over its life: acknowledged plus still queued. The queue is read first:
/// bytes acknowledged between the two reads are then counted in neither, so the result never exceeds
/// what had entered by the time it returns.
pub fn bytes_entered(socket: &impl AsFd) -> io::Result<u64> {
    let queued = send_queue(socket)?;
    Ok(bytes_acked(socket)? + queued)
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
