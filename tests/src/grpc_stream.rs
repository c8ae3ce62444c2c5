//! A real bidirectional-streaming gRPC service and its client, for the telemetry filter's
//! gRPC message counters (istio/proxy's `GrpcStream` scenario).
//!
//! `meshwasm.test.Messages/Stream`: for each request message `Ask { replies: n }` the server
//! answers `n` messages `Reply { seq }`; when the client closes its side, the server ends the
//! call with status OK. Served by tonic's `Grpc::streaming` with prost messages over h2c (no
//! generated code: the service is two messages and one method).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::{http, Service};
use tonic_prost::ProstCodec;

use crate::server::ServerThread;

pub const PATH: &str = "/meshwasm.test.Messages/Stream";

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ask {
    /// How many replies the server sends for this message.
    #[prost(uint32, tag = "1")]
    pub replies: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(uint32, tag = "1")]
    pub seq: u32,
}

/// Messages from a channel, as a stream (request messages on the client, replies on the
/// server).
struct Channel<T>(mpsc::Receiver<T>);

impl<T> Stream for Channel<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

#[derive(Clone, Copy)]
struct Messages;

impl Service<tonic::Request<tonic::Streaming<Ask>>> for Messages {
    type Response = tonic::Response<Channel<Result<Reply, tonic::Status>>>;
    type Error = tonic::Status;
    type Future = BoxFuture<Result<Self::Response, tonic::Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Ask>>) -> Self::Future {
        Box::pin(async move {
            let mut inbound = req.into_inner();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                let mut seq = 0;
                loop {
                    match inbound.message().await {
                        Ok(Some(ask)) => {
                            for _ in 0..ask.replies {
                                seq += 1;
                                if tx.send(Ok(Reply { seq })).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => return, // the client closed its side: end with OK
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            });
            Ok(tonic::Response::new(Channel(rx)))
        })
    }
}

/// The service on its own runtime thread (h2c), stopped on drop.
pub struct MessageServer {
    server: ServerThread,
}

impl MessageServer {
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn start_on(addr: SocketAddr) -> Self {
        Self { server: ServerThread::spawn("meshwasm-grpc-messages", addr, serve) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Reply, Ask>::default());
                let rsp = if req.uri().path() == PATH {
                    grpc.streaming(Messages, req).await
                } else {
                    tonic::Status::unimplemented(req.uri().path().to_string()).into_http()
                };
                Ok::<_, std::convert::Infallible>(rsp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http2_only()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One open `Stream` call (through Envoy or straight to the server).
pub struct MessageStream {
    tx: Option<mpsc::Sender<Ask>>,
    replies: tonic::Streaming<Reply>,
    received: u32,
}

impl MessageStream {
    /// Opens the call on `addr` (h2c) and waits for the response headers.
    pub fn open(addr: SocketAddr) -> Self {
        crate::block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await.expect("client ready");
            let (tx, rx) = mpsc::channel(64);
            let replies = client
                .streaming(
                    tonic::Request::new(Channel(rx)),
                    http::uri::PathAndQuery::from_static(PATH),
                    ProstCodec::<Ask, Reply>::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("open {PATH}: {e}"))
                .into_inner();
            Self { tx: Some(tx), replies, received: 0 }
        })
    }

    /// Sends one message per entry of `replies` and reads the replies they ask for; returns
    /// the number of replies received on this call so far.
    pub fn send(&mut self, replies: &[u32]) -> u32 {
        let tx = self.tx.clone().expect("stream still open for sending");
        let want: u32 = replies.iter().sum();
        let asks: Vec<Ask> = replies.iter().map(|n| Ask { replies: *n }).collect();
        let stream = &mut self.replies;
        let got = crate::block_on(async move {
            for ask in asks {
                tx.send(ask).await.expect("request stream open");
            }
            let mut got = 0;
            while got < want {
                match stream.message().await {
                    Ok(Some(_)) => got += 1,
                    Ok(None) => panic!("the call ended after {got} of {want} replies"),
                    Err(e) => panic!("the call failed after {got} of {want} replies: {e}"),
                }
            }
            got
        });
        self.received += got;
        self.received
    }

    /// Closes the client's side and reads the call to its end: `Ok(extra replies)` when the
    /// server ended it with OK.
    pub fn close(mut self) -> Result<u32, tonic::Status> {
        self.tx = None;
        let stream = &mut self.replies;
        crate::block_on(async move {
            let mut extra = 0;
            while stream.message().await?.is_some() {
                extra += 1;
            }
            Ok(extra)
        })
    }
}
