//! A client's request body, whichever server read it: hyper's HTTP/2 server, or the gateway's own
//! HTTP/1.x server.
#![forbid(unsafe_code)]

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1::body::H1Body;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum RequestBody {
    H2(Incoming),
    H1(H1Body),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::H2(b) => b.is_end_stream(),
            RequestBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::H2(b) => b.size_hint(),
            RequestBody::H1(b) => b.size_hint(),
        }
    }
}
