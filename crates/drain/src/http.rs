//! The plain HTTP servers every binary has (metrics, readiness, admin, the sample app): accept until
//! drained, serve each connection as HTTP/1.1 or HTTP/2, and own every connection's task.

use std::convert::Infallible;

use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{Acceptor, DrainWatcher};

/// Serves `handler` on `listener` (named `name` in the acceptor's logs) until `drain` signals; then
/// stops accepting and closes the connections still open, whose answers are cheap to ask again.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    name: &'static str,
    drain: DrainWatcher,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = JoinSet::new();
    let mut acceptor = Acceptor::new(listener, name);
    loop {
        let (stream, _) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            () = drain.signaled() => break,
        };
        while conns.try_join_next().is_some() {}
        let handler = handler.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    conns.abort_all();
}
