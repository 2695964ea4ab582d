//! The NTLM acceptor state machine: what `AcceptSecurityContext` does with one token.
//!
//! A [`SecurityContext`] is Fresh, Challenged (a Type2 went out; its server challenge is kept) or
//! Authenticated (as a user). Where contexts live (per TCP connection or per connection-id
//! header value) is the caller's business.

use crate::ntlm::{
    self, Authenticate, Negotiate, NtlmError, ServerNames, build_challenge,
    challenge::filetime_now, crypto,
};
use crate::users::UserStore;

/// One client's NTLM security context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SecurityContext {
    #[default]
    Fresh,
    Challenged {
        server_challenge: [u8; 8],
    },
    Authenticated {
        user: String,
    },
}

impl SecurityContext {
    pub fn user(&self) -> Option<&str> {
        match self {
            SecurityContext::Authenticated { user } => Some(user),
            _ => None,
        }
    }
}

/// Why a token did not authenticate. The context is reset to Fresh for every one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("malformed NTLM token: {0}")]
    Malformed(#[from] NtlmError),
    #[error("NTLM message type {0} is not a Type1 or Type3")]
    UnexpectedType(u32),
    #[error("Type3 without a pending challenge in this context")]
    NoPendingChallenge,
    #[error("anonymous authentication is not accepted")]
    Anonymous,
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("user {user:?}: {reason}")]
    BadResponse {
        user: String,
        reason: crypto::ResponseError,
    },
    #[error("user {user:?}: {reason}")]
    ChannelBinding {
        user: String,
        reason: ntlm::binding::BindingError,
    },
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this Type2 back (401 + `WWW-Authenticate: <scheme> <base64>`).
    Challenge(Vec<u8>),
    /// The Type3 was valid; the context is now authenticated as this (configured) user name.
    Accepted(String),
    Rejected(Rejected),
}

/// The server challenge could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate a server challenge: {0}")]
pub struct RandomnessError(getrandom::Error);

pub struct Acceptor {
    users: UserStore,
    names: ServerNames,
    /// `--require-channel-binding`: the MsvAvChannelBindings every Type3 must carry.
    required_binding: Option<[u8; 16]>,
}

impl Acceptor {
    pub fn new(users: UserStore, names: ServerNames) -> Acceptor {
        Acceptor {
            users,
            names,
            required_binding: None,
        }
    }

    /// Refuses every Type3 whose channel binding is not `binding` (Extended Protection,
    /// `tokenChecking="Require"`).
    pub fn require_channel_binding(mut self, binding: [u8; 16]) -> Acceptor {
        self.required_binding = Some(binding);
        self
    }

    /// Feeds one decoded token into `ctx`.
    pub fn step(&self, ctx: &mut SecurityContext, token: &[u8]) -> Result<Step, RandomnessError> {
        let mut server_challenge = [0u8; 8];
        getrandom::fill(&mut server_challenge).map_err(RandomnessError)?;
        Ok(self.step_with(ctx, token, server_challenge, filetime_now()))
    }

    /// [`Acceptor::step`] with the randomness and the clock supplied.
    pub fn step_with(
        &self,
        ctx: &mut SecurityContext,
        token: &[u8],
        server_challenge: [u8; 8],
        filetime: u64,
    ) -> Step {
        // Whatever happened before, a token restarts or finishes the exchange: take the old state.
        let previous = std::mem::take(ctx);
        let result = match ntlm::message_type(token) {
            Ok(ntlm::TYPE_NEGOTIATE) => Negotiate::parse(token)
                .map(|_| {
                    *ctx = SecurityContext::Challenged { server_challenge };
                    Step::Challenge(build_challenge(&self.names, &server_challenge, filetime))
                })
                .map_err(Rejected::from),
            Ok(ntlm::TYPE_AUTHENTICATE) => match previous {
                SecurityContext::Challenged { server_challenge } => {
                    self.authenticate(token, &server_challenge).map(|user| {
                        *ctx = SecurityContext::Authenticated { user: user.clone() };
                        Step::Accepted(user)
                    })
                }
                _ => Err(Rejected::NoPendingChallenge),
            },
            Ok(other) => Err(Rejected::UnexpectedType(other)),
            Err(e) => Err(Rejected::Malformed(e)),
        };
        result.unwrap_or_else(Step::Rejected)
    }

    fn authenticate(&self, token: &[u8], server_challenge: &[u8; 8]) -> Result<String, Rejected> {
        let msg = Authenticate::parse(token)?;
        if msg.user.is_empty() {
            return Err(Rejected::Anonymous);
        }
        let user = self
            .users
            .lookup(&msg.user)
            .ok_or_else(|| Rejected::UnknownUser(msg.user.clone()))?;
        let key = crypto::ntowfv2(&user.nt_hash, &msg.user, &msg.domain);
        crypto::verify_ntlmv2(&key, server_challenge, &msg.nt_response).map_err(|reason| {
            Rejected::BadResponse {
                user: msg.user.clone(),
                reason,
            }
        })?;
        if let Some(expected) = &self.required_binding {
            ntlm::binding::check(expected, &msg.nt_response).map_err(|reason| {
                Rejected::ChannelBinding {
                    user: msg.user.clone(),
                    reason,
                }
            })?;
        }
        Ok(user.name.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ntlm::client::{self, Credentials};
    use crate::ntlm::samples::ms_nlmp_4_2_4_3;

    const TYPE1: &[u8] = client::NEGOTIATE;
    const MS_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];

    pub(crate) fn acceptor() -> Acceptor {
        let mut users = UserStore::default();
        for e in ["User:Password", "alice:Secret1", "bob:Secret2"] {
            users.add_entry(e, "test").expect("test user");
        }
        Acceptor::new(users, ServerNames::new("Domain", "Server"))
    }

    /// A Type3 with an NTLMv2 response computed the way curl does (user/domain in UTF-16).
    pub(crate) fn type3(user: &str, domain: &str, password: &str, challenge: &[u8; 8]) -> Vec<u8> {
        let creds = Credentials::new(user, domain, password);
        // Timestamp 0x11.., client challenge 0x22.., empty target info (its EOL only).
        let blob = client::blob([0x22; 8], 0x1111_1111_1111_1111, &[0; 4]);
        client::authenticate(&creds, "", &creds.nt_response(challenge, &blob))
    }

    fn challenge_of(step: &Step) -> [u8; 8] {
        match step {
            Step::Challenge(t2) => {
                let mut c = [0; 8];
                c.copy_from_slice(&t2[24..32]);
                c
            }
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    #[test]
    fn full_exchange_for_several_users() {
        let a = acceptor();
        for (user, pw, expect) in [("alice", "Secret1", "alice"), ("BOB", "Secret2", "bob")] {
            let mut ctx = SecurityContext::Fresh;
            let ch = challenge_of(&a.step_with(&mut ctx, TYPE1, [7; 8], 1));
            assert_eq!(
                ctx,
                SecurityContext::Challenged {
                    server_challenge: ch
                }
            );
            let step = a.step_with(&mut ctx, &type3(user, "ANY", pw, &ch), [8; 8], 1);
            assert_eq!(step, Step::Accepted(expect.to_string()));
            assert_eq!(ctx.user(), Some(expect));
        }
    }

    #[test]
    fn the_ms_nlmp_message_authenticates_user() {
        let a = acceptor();
        let mut ctx = SecurityContext::Challenged {
            server_challenge: MS_CHALLENGE,
        };
        let step = a.step_with(&mut ctx, &ms_nlmp_4_2_4_3(), [0; 8], 0);
        assert_eq!(step, Step::Accepted("User".to_string()));
    }

    #[test]
    fn wrong_password_unknown_user_and_replay_reset_the_context() {
        let a = acceptor();
        let mut ctx = SecurityContext::Fresh;
        let ch = challenge_of(&a.step_with(&mut ctx, TYPE1, [7; 8], 1));
        let bad = a.step_with(&mut ctx, &type3("alice", "", "Secret2", &ch), [0; 8], 1);
        assert!(matches!(bad, Step::Rejected(Rejected::BadResponse { .. })));
        assert_eq!(ctx, SecurityContext::Fresh);
        // Replaying a valid Type3 without a fresh challenge fails.
        let good = type3("alice", "", "Secret1", &ch);
        assert_eq!(
            a.step_with(&mut ctx, &good, [0; 8], 1),
            Step::Rejected(Rejected::NoPendingChallenge)
        );
        // A Type3 computed for another challenge fails.
        let ch2 = challenge_of(&a.step_with(&mut ctx, TYPE1, [9; 8], 1));
        assert_ne!(ch, ch2);
        assert!(matches!(
            a.step_with(&mut ctx, &good, [0; 8], 1),
            Step::Rejected(Rejected::BadResponse { .. })
        ));
        let ch3 = challenge_of(&a.step_with(&mut ctx, TYPE1, [10; 8], 1));
        assert_eq!(
            a.step_with(&mut ctx, &type3("mallory", "", "x", &ch3), [0; 8], 1),
            Step::Rejected(Rejected::UnknownUser("mallory".to_string()))
        );
        let ch4 = challenge_of(&a.step_with(&mut ctx, TYPE1, [11; 8], 1));
        assert_eq!(
            a.step_with(&mut ctx, &type3("", "", "", &ch4), [0; 8], 1),
            Step::Rejected(Rejected::Anonymous)
        );
    }

    #[test]
    fn garbage_resets_an_authenticated_context() {
        let a = acceptor();
        let mut ctx = SecurityContext::Authenticated {
            user: "alice".to_string(),
        };
        assert!(matches!(
            a.step_with(&mut ctx, b"hello", [0; 8], 1),
            Step::Rejected(Rejected::Malformed(_))
        ));
        assert_eq!(ctx, SecurityContext::Fresh);
    }
}
