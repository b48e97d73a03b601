//! Loopback ports for nodes whose addresses must be known before they start (every node's
//! `--peers` lists them all), without fixed port ranges and without the race of "bind port 0,
//! close, hope nobody takes it before the node binds it".
//!
//! A [`PortReservation`] is a socket bound to `127.0.0.1:0` (the kernel picks the port) with
//! `SO_REUSEADDR`, that never listens. While it is open, the kernel hands the port to nobody
//! else: neither to another bind of port 0 nor (without `SO_REUSEADDR`) to an explicit bind.
//! A node binds the same address and listens on it, as tokio's and std's listeners set
//! `SO_REUSEADDR`; once the node dies, connections to the port are refused (nothing listens),
//! and a restarted node binds it again. The reservation lives as long as the cluster does.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A loopback port held for a node (see the module doc).
#[derive(Debug)]
pub struct PortReservation {
    addr: SocketAddr,
    _socket: OwnedFd,
}

impl PortReservation {
    /// Reserves a port the kernel picks on 127.0.0.1.
    pub fn new() -> io::Result<PortReservation> {
        // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr structs
        // are fully initialized and their sizes passed alongside.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let socket = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            if libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = 0;
            sin.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(
                socket.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut bound_len = len;
            if libc::getsockname(
                socket.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_in).cast(),
                &mut bound_len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let port = u16::from_be(bound.sin_port);
            Ok(PortReservation {
                addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
                _socket: socket,
            })
        }
    }

    /// The reserved address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_bindable_by_a_listener_and_refuses_connections_without_one() {
        let reservation = PortReservation::new().unwrap();
        let addr = reservation.addr();
        assert_ne!(addr.port(), 0);
        // Nothing listens yet: refused.
        assert!(std::net::TcpStream::connect(addr).is_err());
        // A listener (std sets SO_REUSEADDR on Unix) binds it, and it can again after a close.
        for _ in 0..2 {
            let listener = std::net::TcpListener::bind(addr).unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            drop(listener);
        }
        // Port 0 binds never get it while it is reserved.
        for _ in 0..200 {
            let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            assert_ne!(other.local_addr().unwrap(), addr);
        }
    }
}
