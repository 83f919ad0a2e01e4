//! The ceiling: a bare poem 3.1 hello-world on `GET /`, no middleware, no
//! logging, on the same kind of tokio runtime as the server (one worker per
//! core). What it reaches is what poem and this machine allow; the server's
//! REST figures are reported as a fraction of it.

use std::net::SocketAddr;

use anyhow::Context;
use poem::listener::TcpAcceptor;
use poem::{Route, Server, get, handler};

#[handler]
fn hello() -> &'static str {
    "Hello, world!"
}

/// Serves on 127.0.0.1:`port` until killed.
pub fn serve(port: u16) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .context("cannot bind")?;
        let address = listener.local_addr()?;
        eprintln!("ceiling listening on http://{address}");
        Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
            .run(Route::new().at("/", get(hello)))
            .await
            .context("the ceiling server failed")
    })
}
