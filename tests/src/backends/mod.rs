//! Test backends, each on its own thread inside a namespace: `recording` (hyper, keeps headers),
//! `wire` (hyper behind a tap, keeps bodies and the raw upstream bytes), `scripted` (raw TCP that
//! misbehaves on cue).

pub mod recording;
