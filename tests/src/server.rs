//! A test server on its own tokio runtime thread: bound before `spawn` returns, stopped (its
//! connections closed, the port refusing) by [`ServerThread::stop`] or on drop. The upstream and
//! the rate-limit service run on it; their standalone binaries use [`serve_main`].

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub struct ServerThread {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Binds `addr` (port 0 picks a free port) on a new one-worker runtime thread named `name`
    /// and runs `serve(listener)` there. Panics if the bind fails.
    pub fn spawn<F, Fut>(name: &str, addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("server runtime");
                rt.block_on(async move {
                    let listener = match TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = addr_tx.send(Err(format!("bind {addr}: {e}")));
                            return;
                        }
                    };
                    let _ = addr_tx.send(Ok(listener.local_addr().expect("local addr")));
                    tokio::select! {
                        () = serve(listener) => {}
                        _ = stop_rx => {}
                    }
                });
                // Drops every connection task (closing its socket) before the thread ends.
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .unwrap_or_else(|e| panic!("spawn {name} thread: {e}"));
        let addr =
            addr_rx.recv().unwrap_or_else(|_| panic!("{name} thread died")).unwrap_or_else(|e| panic!("{name}: {e}"));
        Self { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread; idempotent.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections forever (a failed accept is retried after 10 ms), sets TCP_NODELAY,
/// and serves each connection with `conn(stream)` on its own task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, conn: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(conn(stream));
    }
}

/// The main of a standalone server binary: binds `listen` on a runtime with `threads`
/// workers, prints `listening on <addr>` (what the demo and scripts wait for), then serves
/// forever. A failed bind exits with status 1.
pub fn serve_main<F, Fut>(program: &str, listen: SocketAddr, threads: usize, serve: F)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
            eprintln!("{program}: bind {listen}: {e}");
            std::process::exit(1)
        });
        let addr = listener.local_addr().expect("local addr");
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        serve(listener).await;
    });
}
