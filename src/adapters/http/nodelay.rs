//! Accepted sockets with Nagle's algorithm off.
//!
//! poem never sets `TCP_NODELAY`, so a small streamed write (an SSE event, a
//! WebSocket token, a Streamable HTTP answer) can wait for the peer's
//! delayed ACK: about 40 ms on Linux. Every write here is a complete frame
//! that should leave at once.

use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use tokio::net::TcpStream;

/// A [`TcpAcceptor`] that sets `TCP_NODELAY` on every connection.
pub struct NoDelayAcceptor(pub TcpAcceptor);

impl Acceptor for NoDelayAcceptor {
    type Io = TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(&mut self) -> std::io::Result<(TcpStream, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, scheme) = self.0.accept().await?;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        Ok((stream, local, remote, scheme))
    }
}
