//! The NTLM side of the test acceptor as a library: NTLM messages and the NTLMv2 crypto
//! (MS-NLMP), shared by the `ntlm-acceptor` binary, which verifies logins, and by the bench's load
//! generator, which performs them with [`ntlm::client`].

pub mod ntlm;
