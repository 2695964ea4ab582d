//! The gateway's own HTTP/1.1 client for backends, built like its HTTP/1.x server: a connection
//! is its stream and a read buffer, with no task or channel of its own; the exchange that uses it
//! writes the request head in one write and reads the response head with `httparse`, and the
//! response body reads the rest by its framing straight off the stream.
//!
//! One module a step: `request` encodes the head and writes the body; `response_head` parses the
//! answer and decides its framing (RFC 9112 §6.3); `send` runs one exchange up to the response
//! head; `body` streams the response body and gives the connection back to its `conn::Home` (the
//! pool, or the client connection it belongs to) once both directions are done.
#![forbid(unsafe_code)]

pub mod body;
pub mod conn;
pub mod request;
pub mod response_head;
pub mod send;
#[cfg(test)]
mod tests;

pub use body::UpstreamBody;
pub use conn::{Connection, Home, Slot, SlotError};
pub use send::{ExchangeError, Failed, PendingUpstreamUpgrade, UpstreamUpgrade, send};
