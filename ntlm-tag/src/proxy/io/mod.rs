//! Byte streams under the HTTP server: a stream that replays bytes read past a PROXY header, and
//! the clock that bounds how long a request head may take to arrive.

pub mod head_clock;
pub mod prefixed;
