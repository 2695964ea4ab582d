//! The Debian mirror this machine's apt uses, read from `/etc/apt/sources.list` and
//! `/etc/apt/sources.list.d/` (one-line `.list` and deb822 `.sources` files), so that tasks which
//! fetch Debian packages of their own (kernels for the VM matrix, the package test's chroot) go
//! where the machine's apt goes: a local mirror or proxy works without changing any code.

use std::fs;

use anyhow::{Context, Result};

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Debian suite names a main archive is recognised by (other repositories in the sources, such as
/// a vendor's, have suites of their own).
const DEBIAN_SUITES: &[&str] = &[
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// Where Debian's packages come from on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianMirror {
    /// The main archive, e.g. `http://mirror.example/debian`.
    pub archive: String,
    /// The security archive, when the sources name one.
    pub security: Option<String>,
    /// The suite the machine runs, e.g. `bookworm`.
    pub suite: String,
}

/// One `deb` source: a URI and its suites.
#[derive(Debug)]
struct Source {
    uri: String,
    suites: Vec<String>,
}

/// The mirror of `--mirror` when given, else the machine's own.
pub fn debian_mirror(given: Option<&str>) -> Result<DebianMirror> {
    let found = machine_mirror();
    if let Some(uri) = given {
        let uri = uri.trim_end_matches('/').to_string();
        return Ok(match found {
            Ok(m) => DebianMirror {
                archive: uri,
                security: m.security,
                suite: m.suite,
            },
            Err(_) => DebianMirror {
                archive: uri,
                security: None,
                suite: "stable".to_string(),
            },
        });
    }
    found.context("give the Debian mirror with --mirror URL")
}

fn machine_mirror() -> Result<DebianMirror> {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string(SOURCES_LIST) {
        sources.extend(parse_one_line(&text));
    }
    let mut files: Vec<_> = fs::read_dir(SOURCES_DIR)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for path in files {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => sources.extend(parse_one_line(&text)),
            Some("sources") => sources.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    pick(&sources).ok_or_else(|| {
        anyhow::anyhow!(
            "no Debian archive (a suite such as bookworm with component main) in {SOURCES_LIST} or \
             {SOURCES_DIR}/"
        )
    })
}

fn pick(sources: &[Source]) -> Option<DebianMirror> {
    let (archive, suite) = sources.iter().find_map(|s| {
        let suite = s
            .suites
            .iter()
            .find(|x| DEBIAN_SUITES.contains(&x.as_str()))?;
        Some((s.uri.clone(), suite.clone()))
    })?;
    let security = sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x.ends_with("-security")))
        .map(|s| s.uri.clone());
    Some(DebianMirror {
        archive,
        security,
        suite,
    })
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn parse_one_line(text: &str) -> Vec<Source> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets may contain spaces: skip past the closing bracket.
            let rest = match rest.strip_prefix('[') {
                Some(opts) => opts.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.trim_end_matches('/').to_string();
            let suite = words.next()?.to_string();
            words.any(|c| c == "main").then_some(Source {
                uri,
                suites: vec![suite],
            })
        })
        .collect()
}

/// deb822 stanzas with `Types: deb`, `URIs:`, `Suites:`, `Components:` (and `Enabled: no`).
fn parse_deb822(text: &str) -> Vec<Source> {
    text.split("\n\n")
        .flat_map(|stanza| {
            let field = |name: &str| -> Vec<String> {
                stanza
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default()
            };
            let usable = field("Types").iter().any(|t| t == "deb")
                && field("Components").iter().any(|c| c == "main")
                && !field("Enabled").iter().any(|e| e == "no");
            let suites = field("Suites");
            field("URIs")
                .into_iter()
                .filter(move |_| usable)
                .map(move |uri| Source {
                    uri: uri.trim_end_matches('/').to_string(),
                    suites: suites.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_deb822_file_with_a_security_archive() {
        let text = "Types: deb\n# http://snapshot.example/archive/debian/20250520T000000Z\n\
                    URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            pick(&parse_deb822(text)),
            Some(DebianMirror {
                archive: "http://mirror.example/debian".into(),
                security: Some("http://mirror.example/debian-security".into()),
                suite: "bookworm".into(),
            })
        );
    }

    #[test]
    fn reads_one_line_sources_and_skips_other_repositories() {
        let text = "deb https://vendor.example/apt cloud-sdk-bookworm main\n\
                    # deb http://old.example/debian bullseye main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://local.example:3142/debian/ trixie main contrib\n";
        let m = pick(&parse_one_line(text)).expect("found");
        assert_eq!(m.archive, "http://local.example:3142/debian");
        assert_eq!(m.suite, "trixie");
        assert_eq!(m.security, None);
    }

    #[test]
    fn a_disabled_stanza_is_not_used() {
        let text = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\
                    Components: main\nEnabled: no\n";
        assert_eq!(pick(&parse_deb822(text)), None);
    }
}
