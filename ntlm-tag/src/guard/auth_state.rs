//! Where a client connection stands with NTLM/Negotiate, as seen from its requests and responses.
#![forbid(unsafe_code)]

use http::{HeaderMap, StatusCode, header};
use serde::Serialize;

use crate::ntlm::{ClientToken, Message};

/// The authentication state of one client connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuthState {
    /// No NTLM/Negotiate token sent yet.
    #[default]
    Anonymous,
    /// A handshake is under way (Type1 sent, challenge answered, Kerberos leg pending).
    Negotiating,
    /// The backend accepted the connection's credentials: `DOMAIN\user` (NTLM), `None` for
    /// Kerberos (its names are encrypted).
    Authenticated(Option<Box<str>>),
    /// The backend refused the last credentials (a `401` to a Type3 or a Kerberos token).
    Failed(Option<Box<str>>),
}

/// The states as metric labels, in [`AuthState::index`] order.
pub const STATE_NAMES: [&str; 4] = ["anonymous", "negotiating", "authenticated", "failed"];

impl AuthState {
    pub fn index(&self) -> usize {
        match self {
            AuthState::Anonymous => 0,
            AuthState::Negotiating => 1,
            AuthState::Authenticated(_) => 2,
            AuthState::Failed(_) => 3,
        }
    }

    pub fn name(&self) -> &'static str {
        STATE_NAMES[self.index()]
    }

    /// The account the state names, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            AuthState::Authenticated(u) | AuthState::Failed(u) => u.as_deref(),
            _ => None,
        }
    }
}

impl Serialize for AuthState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What one request's token means for the connection, before its response is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leg {
    /// A leg that only starts or continues a handshake (Type1, an unreadable token).
    Handshake,
    /// A final NTLM leg: a Type3 naming `DOMAIN\user` (empty for an anonymous Type3).
    Credentials(String),
    /// A Kerberos token: final unless the backend answers with another challenge.
    Kerberos,
}

impl Leg {
    pub fn of(token: &ClientToken) -> Leg {
        match token {
            ClientToken::Ntlm(Message::Authenticate(a)) => Leg::Credentials(a.account()),
            ClientToken::Kerberos => Leg::Kerberos,
            ClientToken::Ntlm(_) | ClientToken::Unreadable => Leg::Handshake,
        }
    }

    /// The connection's state once the backend answered `status` (`challenged`: the 401 carried
    /// a continuation token, so the handshake goes on).
    pub fn outcome(&self, status: StatusCode, challenged: bool) -> AuthState {
        let user = match self {
            Leg::Credentials(account) if !account.is_empty() => Some(account.as_str().into()),
            _ => None,
        };
        match status {
            StatusCode::UNAUTHORIZED => match self {
                // A Type3 is the last NTLM leg: any 401 after it, challenge or not, is a refusal.
                Leg::Credentials(_) => AuthState::Failed(user),
                Leg::Handshake | Leg::Kerberos if challenged => AuthState::Negotiating,
                Leg::Handshake | Leg::Kerberos => AuthState::Failed(None),
            },
            // A gateway or backend error says nothing about the credentials.
            s if s.is_server_error() => AuthState::Negotiating,
            _ => match self {
                Leg::Handshake => AuthState::Negotiating,
                Leg::Credentials(_) | Leg::Kerberos => AuthState::Authenticated(user),
            },
        }
    }

    /// A Type3 naming an account (anonymous ones are not counted against anyone).
    pub fn account(&self) -> Option<&str> {
        match self {
            Leg::Credentials(a) if !a.is_empty() => Some(a),
            _ => None,
        }
    }
}

/// A `WWW-Authenticate: NTLM|Negotiate <token>`: the backend continues a handshake (a bare
/// scheme only offers one).
pub fn carries_challenge(headers: &HeaderMap) -> bool {
    headers.get_all(header::WWW_AUTHENTICATE).iter().any(|v| {
        let v = v.as_bytes().trim_ascii();
        let Some(space) = v.iter().position(|b| *b == b' ') else {
            return false;
        };
        let (scheme, token) = v.split_at(space);
        (scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate"))
            && !token.trim_ascii().is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntlm_handshake_states() {
        let type1 = Leg::Handshake;
        assert_eq!(
            type1.outcome(StatusCode::UNAUTHORIZED, true),
            AuthState::Negotiating
        );
        assert_eq!(
            type1.outcome(StatusCode::UNAUTHORIZED, false),
            AuthState::Failed(None)
        );
        let type3 = Leg::Credentials("CORP\\alice".into());
        assert_eq!(
            type3.outcome(StatusCode::OK, false),
            AuthState::Authenticated(Some("CORP\\alice".into()))
        );
        assert_eq!(
            type3.outcome(StatusCode::FORBIDDEN, false),
            AuthState::Authenticated(Some("CORP\\alice".into()))
        );
        for challenged in [false, true] {
            assert_eq!(
                type3.outcome(StatusCode::UNAUTHORIZED, challenged),
                AuthState::Failed(Some("CORP\\alice".into()))
            );
        }
        assert_eq!(
            type3.outcome(StatusCode::BAD_GATEWAY, false),
            AuthState::Negotiating
        );
        assert_eq!(type3.account(), Some("CORP\\alice"));
        assert_eq!(Leg::Credentials(String::new()).account(), None);
    }

    #[test]
    fn kerberos_states() {
        assert_eq!(
            Leg::Kerberos.outcome(StatusCode::OK, false),
            AuthState::Authenticated(None)
        );
        assert_eq!(
            Leg::Kerberos.outcome(StatusCode::UNAUTHORIZED, true),
            AuthState::Negotiating
        );
        assert_eq!(
            Leg::Kerberos.outcome(StatusCode::UNAUTHORIZED, false),
            AuthState::Failed(None)
        );
        assert_eq!(AuthState::Failed(None).name(), "failed");
    }
}
