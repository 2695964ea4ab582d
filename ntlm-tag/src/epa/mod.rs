//! Extended Protection for Authentication (EPA) through the gateway.
//!
//! A client that logs in over TLS binds its NTLM/Kerberos authentication to the certificate it
//! saw: the `tls-server-end-point` channel binding (RFC 5929) is a hash of the server's leaf
//! certificate, carried inside the NTLMv2 response (`MsvAvChannelBindings`). A backend with
//! Extended Protection (Exchange, IIS with `tokenChecking="Require"`, AD FS) compares it with the
//! hash of *its own* certificate. Through a gateway that re-encrypts, both legs agree only when the
//! gateway's listener and the backend present the same leaf certificate (TLS bridging, the one
//! set-up Microsoft supports); offloading to plain HTTP cannot work.
//!
//! [`bridging`] checks that set-up at start-up, on reload and in `ntlm-tag check`; when a backend
//! refuses a login anyway, `upstream::epa_diagnosis` says why.
#![forbid(unsafe_code)]

pub mod bridging;
