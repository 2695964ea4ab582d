//! The local account database: `NAME:PASSWORD` entries, looked up case-insensitively by name (as
//! Windows does). Only the NT hash of each password is kept.

use std::collections::HashMap;
use std::path::Path;

use crate::ntlm::crypto::nt_hash;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{origin}: expected NAME:PASSWORD, got {entry:?}")]
    Malformed { origin: String, entry: String },
    #[error("{origin}: user name {name:?} contains control characters")]
    BadName { origin: String, name: String },
    #[error("{origin}: user {name:?} is defined twice (names are case-insensitive)")]
    Duplicate { origin: String, name: String },
    #[error("cannot read users file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The name as configured; this is the name reported as authenticated.
    pub name: String,
    pub nt_hash: [u8; 16],
}

#[derive(Debug, Default)]
pub struct UserStore {
    by_folded_name: HashMap<String, User>,
}

fn fold(name: &str) -> String {
    name.to_lowercase()
}

impl UserStore {
    /// Adds one `NAME:PASSWORD` entry (split at the first `:`; the password may contain `:`).
    /// `origin` names where the entry came from, for error messages.
    pub fn add_entry(&mut self, entry: &str, origin: &str) -> Result<(), UsersError> {
        let Some((name, password)) = entry.split_once(':').filter(|(n, _)| !n.is_empty()) else {
            return Err(UsersError::Malformed {
                origin: origin.to_string(),
                entry: entry.to_string(),
            });
        };
        if name.chars().any(char::is_control) {
            return Err(UsersError::BadName {
                origin: origin.to_string(),
                name: name.to_string(),
            });
        }
        let user = User {
            name: name.to_string(),
            nt_hash: nt_hash(password),
        };
        if self.by_folded_name.insert(fold(name), user).is_some() {
            return Err(UsersError::Duplicate {
                origin: origin.to_string(),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Adds every line of a users file; empty lines and lines starting with `#` are skipped.
    pub fn add_file_contents(&mut self, contents: &str, path: &str) -> Result<(), UsersError> {
        for (i, line) in contents.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            self.add_entry(line, &format!("{path}:{}", i + 1))?;
        }
        Ok(())
    }

    pub fn add_file(&mut self, path: &Path) -> Result<(), UsersError> {
        let shown = path.display().to_string();
        let contents = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: shown.clone(),
            source,
        })?;
        self.add_file_contents(&contents, &shown)
    }

    /// The account for a user name as a client sent it.
    pub fn lookup(&self, wire_name: &str) -> Option<&User> {
        self.by_folded_name.get(&fold(wire_name))
    }

    pub fn len(&self) -> usize {
        self.by_folded_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_folded_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_files_and_lookup() -> Result<(), UsersError> {
        let mut s = UserStore::default();
        s.add_entry("alice:Secret1", "--user")?;
        s.add_file_contents("# accounts\r\n\nbob:pa:ss\r\n  \nCarol:\n", "users.txt")?;
        assert_eq!(s.len(), 3);
        assert_eq!(s.lookup("ALICE").map(|u| u.name.as_str()), Some("alice"));
        assert_eq!(s.lookup("bob").map(|u| u.nt_hash), Some(nt_hash("pa:ss")));
        assert_eq!(s.lookup("carol").map(|u| u.nt_hash), Some(nt_hash("")));
        assert!(s.lookup("mallory").is_none());
        Ok(())
    }

    #[test]
    fn bad_entries() {
        let mut s = UserStore::default();
        assert!(matches!(
            s.add_entry("nopassword", "--user"),
            Err(UsersError::Malformed { .. })
        ));
        assert!(matches!(
            s.add_entry(":pw", "--user"),
            Err(UsersError::Malformed { .. })
        ));
        assert!(matches!(
            s.add_entry("a\tb:pw", "--user"),
            Err(UsersError::BadName { .. })
        ));
        assert!(s.add_entry("dave:1", "--user").is_ok());
        assert!(matches!(
            s.add_entry("DAVE:2", "--user"),
            Err(UsersError::Duplicate { .. })
        ));
        let err = s.add_file_contents("ok:1\nbroken\n", "f");
        assert!(matches!(err, Err(UsersError::Malformed { ref origin, .. }) if origin == "f:2"));
    }
}
