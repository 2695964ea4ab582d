//! The HTTP/1.x server side of client connections (plain and TLS), built for connections that
//! stay open and idle for hours (authenticated NTLM connections of Outlook, ActiveSync): an idle
//! connection holds no read or write buffer, only its stream and a few words of state.
//!
//! One module a step: `reader` owns the stream's read side and its read-ahead bytes; `head` parses
//! a request head (`httparse`, by hyper's rules and limits) and `framing` decides how its body is
//! delimited; `body` streams that body to the upstream side, decoding `chunked`; `response` writes
//! the response head and body by their framing; `server` is the keep-alive loop that ties them
//! together. HTTP/2 from clients stays with hyper.
#![forbid(unsafe_code)]

pub mod body;
mod date;
pub mod head;
pub mod reader;
pub mod response;
mod server;

pub use crate::http1::{chunked, framing};
pub use server::PendingUpgrade;
pub(super) use server::serve;
