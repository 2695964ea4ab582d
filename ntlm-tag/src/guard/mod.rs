//! Auth-aware connections and lockout protection: who each client connection authenticated as,
//! and a gateway that stops a client looping on a bad password before the domain locks the account.
#![forbid(unsafe_code)]

pub mod auth_state;

pub use auth_state::{AuthState, Leg};
