//! Test backends, each on its own thread inside a namespace, stopped on drop:
//! [`recording`] (HTTP/1.1, keeps each request's headers and peer), [`wire`] (keeps bodies and the
//! raw bytes of each upstream connection), [`scripted`] (raw TCP that misbehaves on cue). The real
//! NTLM acceptor is [`crate::acceptor`].

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use crate::netns::NetNs;

pub mod recording;
pub mod scripted;
pub mod wire;

type Shared<T> = Arc<Mutex<T>>;

/// All values of the header `name` (case-insensitive), as text.
fn header_values(headers: &http::HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// A listener accepting on its own thread in a namespace, each connection served by a task of
/// its own; stops accepting (and joins the thread) on drop.
struct Listening {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Listening {
    /// Binds `addr` in `ns` (returning once it listens) and hands every accepted connection to
    /// `serve`.
    fn start<F, Fut>(ns: &NetNs, addr: SocketAddr, mut serve: F) -> Listening
    where
        F: FnMut(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || async move {
            let listener = TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("backend bind {addr}: {e}"));
            let _ = ready_tx.send(());
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                    _ = &mut stop_rx => return,
                };
                tokio::spawn(serve(stream, peer));
            }
        });
        ready_rx
            .recv()
            .unwrap_or_else(|_| panic!("backend on {addr} failed to start"));
        Listening {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
