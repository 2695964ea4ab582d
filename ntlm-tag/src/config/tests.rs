use std::{path::Path, time::Duration};

use super::{file::*, *};
use crate::{
    admin::AdminEndpoint,
    identity::conn_id::DEFAULT_TEMPLATE,
    kernel::EbpfMode,
    proxy::{ListenerConfig, tls::TlsCertConfig},
    upstream::tls::BackendTlsConfig,
};

fn args() -> RunArgs {
    RunArgs::default()
}

fn key_of(e: ConfigError) -> &'static str {
    match e {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid key, got {other}"),
    }
}

#[test]
fn minimal_file_gets_defaults() {
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:8080"]
           backends = ["10.0.0.5:80"]"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(c.identity.header.as_str(), "jespa-connection-id");
    assert_eq!(c.identity.template.as_str(), DEFAULT_TEMPLATE);
    assert_eq!(c.ebpf.mode, EbpfMode::Auto);
    assert_eq!(c.ebpf.map_entries, 262_144);
    assert!(c.identity.forwarded_headers);
    assert_eq!(c.backends[0].authority.as_str(), "10.0.0.5:80");
    // Safe with every backend unless the operator opts into sharing authenticated connections.
    assert_eq!(c.mode, Mode::Bind);
}

#[test]
fn route_timeouts_and_upstream_caps() {
    let base = "listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n";
    let c = Config::from_toml(base, &args()).expect("valid");
    assert!(c.route_timeouts.is_empty());
    assert_eq!(c.upstream_caps, DedicatedCaps::default());
    let c = Config::from_toml(
        &format!(
            "{base}[timeouts]\nupstream_response_secs = 30\n\
             [[timeouts.route]]\npath_prefix = \"/Microsoft-Server-ActiveSync\"\nresponse_secs = 3600\n\
             [upstream_caps]\nmax_age_secs = 600\nmax_requests = 1000\n"
        ),
        &args(),
    )
    .expect("valid");
    assert_eq!(c.timeouts.upstream_response, Duration::from_secs(30));
    assert_eq!(
        c.route_timeouts
            .response_for("/Microsoft-Server-ActiveSync?Cmd=Ping"),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(c.route_timeouts.response_for("/owa/"), None);
    assert_eq!(c.upstream_caps.max_age, Some(Duration::from_secs(600)));
    assert_eq!(c.upstream_caps.max_requests, Some(1000));
    let effective = c.to_toml();
    assert!(effective.contains("[[timeouts.route]]"), "{effective}");
    assert!(effective.contains("[upstream_caps]"), "{effective}");
    // The effective configuration is itself a valid configuration, routes included.
    let again = Config::from_toml(&effective, &args()).expect("round trip");
    assert_eq!(again.to_toml(), effective);
    for (text, key) in [
        (
            "[[timeouts.route]]\npath_prefix = \"ews\"\nresponse_secs = 5",
            "timeouts.route.path_prefix",
        ),
        (
            "[[timeouts.route]]\npath_prefix = \"/ews\"\nresponse_secs = 0",
            "timeouts.route.response_secs",
        ),
        (
            "[upstream_caps]\nmax_age_secs = -1",
            "upstream_caps.max_age_secs",
        ),
    ] {
        match Config::from_toml(&format!("{base}{text}"), &args()) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn lockout_defaults_keys_and_errors() {
    let base = "listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n";
    let c = Config::from_toml(base, &args()).expect("valid");
    assert_eq!(c.lockout, LockoutConfig::default());
    assert!(c.lockout.enabled);
    assert_eq!(c.lockout.max_failures, 4);
    let c = Config::from_toml(
        &format!(
            "{base}[lockout]\nmax_failures = 2\nwindow_secs = 60\nallow = [\"10.0.0.0/8\"]\n\
             max_failures_per_user = 9\nmax_tracked = 10"
        ),
        &args(),
    )
    .expect("valid");
    assert_eq!(c.lockout.max_failures, 2);
    assert_eq!(c.lockout.window, Duration::from_secs(60));
    assert_eq!(c.lockout.max_failures_per_user, 9);
    assert!(c.to_toml().contains("[lockout]"));
    for (text, key) in [
        ("max_failures = 0", "lockout.max_failures"),
        ("window_secs = 0", "lockout.window_secs"),
        ("window_secs = 1e9", "lockout.window_secs"),
        ("max_tracked = 0", "lockout.max_tracked"),
    ] {
        let e = Config::from_toml(&format!("{base}[lockout]\n{text}"), &args()).expect_err(text);
        assert_eq!(key_of(e), key, "{text}");
    }
    assert!(matches!(
        Config::from_toml(&format!("{base}[lockout]\nthreshold = 3"), &args()),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn every_mode_parses_and_an_unknown_one_is_refused() {
    for (text, mode) in [("bind", Mode::Bind), ("tag", Mode::Tag), ("pin", Mode::Pin)] {
        let c = Config::from_toml(
            &format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\nmode = \"{text}\""),
            &args(),
        )
        .expect("valid");
        assert_eq!(c.mode, mode);
        assert_eq!(mode.warning().is_some(), mode == Mode::Tag, "{text}");
    }
    assert!(matches!(
        Config::from_toml("mode = \"share\"", &args()),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn flags_override_the_file() {
    let mut a = args();
    a.listen = vec!["127.0.0.1:9000".parse().expect("addr")];
    a.header = Some("X-Conn".into());
    a.ebpf = Some(EbpfMode::Off);
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:8080"]
           backends = ["b:80"]
           header = "Other"
           ebpf = "required""#,
        &a,
    )
    .expect("valid");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].address.port(), 9000);
    assert_eq!(c.identity.header.as_str(), "x-conn");
    assert_eq!(c.ebpf.mode, EbpfMode::Off);
}

#[test]
fn listeners_as_tables_and_ipv6() {
    let c = Config::from_toml(
        r#"listen = ["[::]:8080", { address = "198.18.0.1:81" }]
           backends = ["[fd00::5]:80"]"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.backends[0].authority.host(), "[fd00::5]");
}

#[test]
fn https_backends_as_addresses_and_tables() {
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:80"]
           backends = [
             "10.0.0.5:80",
             "http://10.0.0.6:8080",
             "https://exch1.corp.example",
             { address = "https://10.0.0.7:8443", tls_server_name = "mail.corp.example", ca_file = "/etc/ntlm-tag/ca.pem", client_cert = "/c.pem", client_key = "/c.key" },
           ]"#,
        &args(),
    )
    .expect("valid");
    let shown: Vec<String> = c.backends.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "10.0.0.5:80",
            "10.0.0.6:8080",
            "https://exch1.corp.example:443",
            "https://10.0.0.7:8443"
        ]
    );
    assert_eq!(c.backends[0].tls, None);
    assert_eq!(c.backends[1].tls, None);
    assert_eq!(c.backends[2].tls, Some(BackendTlsConfig::default()));
    let table = c.backends[3].tls.as_ref().expect("tls");
    assert_eq!(table.tls_server_name.as_deref(), Some("mail.corp.example"));
    assert_eq!(
        table.ca_file.as_deref(),
        Some(Path::new("/etc/ntlm-tag/ca.pem"))
    );
    let effective = c.to_toml();
    assert!(
        effective.contains("tls_server_name = \"mail.corp.example\""),
        "{effective}"
    );
    // The flag keeps meaning plain HTTP, and takes https:// too.
    let mut a = args();
    a.backends = vec!["b:80".into(), "https://b".into()];
    let c = Config::from_toml(r#"listen = ["0.0.0.0:80"]"#, &a).expect("valid");
    assert_eq!(c.backends[0].tls, None);
    assert!(c.backends[1].tls.is_some());
    for bad in [
        r#"backends = ["ftp://b:21"]"#,
        r#"backends = ["https://u:p@b"]"#,
        r#"backends = [{ address = "b:80", ca_file = "/ca.pem" }]"#,
        r#"backends = [{ address = "https://b", client_cert = "/c.pem" }]"#,
        r#"backends = [{ address = "https://b", tls_server_name = "a b" }]"#,
    ] {
        let doc = format!("listen = [\"0.0.0.0:80\"]\n{bad}");
        match Config::from_toml(&doc, &args()) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "backends", "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn epa_bridging_needs_a_tls_listener_and_https_backends() {
    const TLS_LISTEN: &str =
        r#"listen = [{ address = "0.0.0.0:443", tls = [{ cert = "/c.pem", key = "/c.key" }] }]"#;
    for (doc, why) in [
        (
            "listen = [\"0.0.0.0:80\"]\nbackends = [\"https://b\"]\nepa_bridging = true"
                .to_string(),
            "no listener terminates TLS",
        ),
        (
            format!("{TLS_LISTEN}\nbackends = [\"https://a\", \"b:80\"]\nepa_bridging = true"),
            "backend b:80 is plain HTTP",
        ),
    ] {
        match Config::from_toml(&doc, &args()) {
            Err(ConfigError::Invalid { key, message }) => {
                assert_eq!(key, "epa_bridging");
                assert!(message.contains(why), "{message}");
            }
            other => panic!("{doc}: {other:?}"),
        }
    }
    let c = Config::from_toml(
        &format!("{TLS_LISTEN}\nbackends = [\"https://a\"]\nepa_bridging = true"),
        &args(),
    )
    .expect("valid");
    assert!(c.epa_bridging);
    assert!(c.to_toml().contains("epa_bridging = true"));
}

#[test]
fn errors_name_the_key() {
    let cases = [
        (r#"backends = ["b:80"]"#, "listen"),
        (r#"listen = ["0.0.0.0:1"]"#, "backends"),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["no-port"]"#,
            "backends",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["u:p@b:80"]"#,
            "backends",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            header = "bad header""#,
            "header",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            header = "Host""#,
            "header",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            id_template = "{client}""#,
            "id_template",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            id_template = " {client}/{uid}""#,
            "id_template",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            id_template = "{client}/{uid} ""#,
            "id_template",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            map_entries = 0"#,
            "map_entries",
        ),
        (
            r#"listen = ["0.0.0.0:1"]
            backends = ["b:80"]
            [timeouts]
            upstream_connect_secs = -1"#,
            "timeouts.upstream_connect_secs",
        ),
        (
            r#"listen = ["0.0.0.0:1", "0.0.0.0:1"]
            backends = ["b:80"]"#,
            "listen",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml(text, &args()).expect_err(text);
        assert_eq!(key_of(err), key, "{text}");
    }
}

#[test]
fn trust_list_proxy_protocol_and_toa() {
    let c = Config::from_toml(
        r#"listen = [{ address = "0.0.0.0:80", proxy_protocol = true }, "0.0.0.0:81"]
           backends = ["b:80"]
           trusted_lbs = ["198.18.5.7/24", "fd00:5418::/48"]
           toa_kind = 200"#,
        &args(),
    )
    .expect("valid");
    assert!(c.listeners[0].proxy_protocol);
    assert!(!c.listeners[1].proxy_protocol);
    assert_eq!(c.trust.proxy[0].to_string(), "198.18.5.0/24");
    assert_eq!(c.ebpf.toa_kind, 200);
    assert_eq!(c.trust.toa, c.trust.proxy, "TOA falls back to trusted_lbs");
    let err = Config::from_toml(
        r#"listen = [{ address = "0.0.0.0:80", proxy_protocol = true }]
           backends = ["b:80"]"#,
        &args(),
    )
    .expect_err("PROXY protocol without a trusted balancer");
    assert_eq!(key_of(err), "trusted_lbs");
    let err = Config::from_toml(
        r#"listen = ["0.0.0.0:80"]
           backends = ["b:80"]
           toa_kind = 2"#,
        &args(),
    )
    .expect_err("MSS is not TOA");
    assert_eq!(key_of(err), "toa_kind");
    assert!(matches!(
        Config::from_toml(
            r#"listen = ["0.0.0.0:80"]
               backends = ["b:80"]
               trusted_lbs = ["not-a-cidr"]"#,
            &args()
        ),
        Err(ConfigError::Parse { .. })
    ));
}

const BASE: &str = "listen = [\"0.0.0.0:80\"]\nbackends = [\"b:80\"]\n";

fn with(text: &str, a: &RunArgs) -> Result<Config, ConfigError> {
    Config::from_toml(&format!("{BASE}{text}"), a)
}

fn nets(list: &[ipnet::IpNet]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

#[test]
fn routes_name_pools_with_checks_of_their_own_and_check_prints_them_back() {
    let text = r#"
        [health_check]
        path = "/healthz"
        [[route]]
        path_prefix = "/owa/"
        backends = ["a:80", "https://c"]
        health_check = { path = "/owa/healthcheck.htm", expect_status = 200 }
        [[route]]
        path_prefix = "/ews"
        backends = ["b:80"]
    "#;
    let c = with(text, &args()).expect("valid");
    assert_eq!(c.routes.len(), 2);
    assert_eq!(
        c.routes[0].path_prefix, "/owa",
        "the trailing slash is dropped"
    );
    let shown: Vec<String> = c.routes[0]
        .backends
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown, ["a:80", "https://c:443"]);
    let check = c.routes[0].health_check.as_ref().expect("a check");
    assert_eq!(check.path, "/owa/healthcheck.htm");
    assert!(c.routes[1].health_check.is_none(), "no check unless given");
    let all: Vec<String> = c.all_backends().iter().map(ToString::to_string).collect();
    assert_eq!(all, ["b:80", "a:80", "https://c:443"]);
    // `check` prints them, and what it prints is a valid configuration again.
    let printed = c.to_toml();
    assert!(printed.contains("[[route]]") && printed.contains("/owa/healthcheck.htm"));
    let again = Config::from_toml(&printed, &args()).expect("the printed file parses");
    assert_eq!(again.routes.len(), 2);
    assert_eq!(again.routes[0].backends, c.routes[0].backends);
}

#[test]
fn bad_routes_are_refused_naming_the_key() {
    for (text, key) in [
        (
            "[[route]]\npath_prefix = \"/\"\nbackends = [\"a:80\"]",
            "route.path_prefix",
        ),
        (
            "[[route]]\npath_prefix = \"owa\"\nbackends = [\"a:80\"]",
            "route.path_prefix",
        ),
        (
            "[[route]]\npath_prefix = \"/o wa\"\nbackends = [\"a:80\"]",
            "route.path_prefix",
        ),
        (
            "[[route]]\npath_prefix = \"/owa?x\"\nbackends = [\"a:80\"]",
            "route.path_prefix",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
             [[route]]\npath_prefix = \"/OWA/\"\nbackends = [\"a:80\"]",
            "route.path_prefix",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = []",
            "route.backends",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a\"]",
            "route.backends",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"https://b:80\"]",
            "route.backends",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
             health_check = { path = \"owa\" }",
            "route.health_check.path",
        ),
        (
            "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
             health_check = { expect_status = 999 }",
            "route.health_check.expect_status",
        ),
    ] {
        match with(text, &args()) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(matches!(
        with("[[route]]\nbackends = [\"a:80\"]", &args()),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn toa_and_ipip_are_off_unless_configured() {
    let c = with(r#"trusted_lbs = ["198.18.1.0/24"]"#, &args()).expect("valid");
    assert_eq!(c.ebpf.toa_kind, 0, "TOA is off by default");
    assert!(c.trust.toa.is_empty());
    assert!(c.trust.ipip.is_empty());
    assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24"]);
    // The same with flags: --trusted-lb alone no longer turns TOA on.
    let mut a = args();
    a.trusted_lbs = vec!["198.18.1.100/32".parse().expect("net")];
    let c = Config::from_toml(BASE, &a).expect("valid");
    assert_eq!((c.ebpf.toa_kind, c.trust.toa.len()), (0, 0));
    // toa_kind = 0 is off, as before.
    let c = with("trusted_lbs = [\"198.18.1.0/24\"]\ntoa_kind = 0", &args()).expect("valid");
    assert!(c.trust.toa.is_empty());
    // And off is what `check` prints: no TOA or IPIP list, and the output parses again.
    let text = c.to_toml();
    assert!(text.contains("toa_kind = 0"), "{text}");
    assert!(!text.contains("toa_trusted_lbs") && !text.contains("ipip_trusted_lbs"));
}

#[test]
fn each_mechanism_has_its_own_list_or_falls_back_to_trusted_lbs() {
    // --trusted-lb CIDR --toa-kind 254: TOA from CIDR, as before.
    let mut a = args();
    a.trusted_lbs = vec!["198.18.1.0/24".parse().expect("net")];
    a.toa_kind = Some(254);
    let c = Config::from_toml(BASE, &a).expect("valid");
    assert_eq!(c.ebpf.toa_kind, 254);
    assert_eq!(nets(&c.trust.toa), ["198.18.1.0/24"]);
    // Own lists win over trusted_lbs, flags over the file.
    let c = with(
        r#"trusted_lbs = ["198.18.1.0/24"]
           toa_kind = 254
           toa_trusted_lbs = ["198.18.7.0/24"]
           xdp = ["eth1"]
           ipip_trusted_lbs = ["198.18.8.1/32", "fd00:5418:8::/64"]"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24"]);
    assert_eq!(nets(&c.trust.toa), ["198.18.7.0/24"]);
    assert_eq!(nets(&c.trust.ipip), ["198.18.8.1/32", "fd00:5418:8::/64"]);
    let text = c.to_toml();
    assert!(
        text.contains("toa_trusted_lbs = [\"198.18.7.0/24\"]"),
        "{text}"
    );
    let again = Config::from_toml(&text, &args()).expect("check output re-parses");
    assert_eq!(again.trust, c.trust);
    let mut a = args();
    a.toa_trusted_lbs = vec!["198.18.9.0/24".parse().expect("net")];
    let c = with(
        "trusted_lbs = [\"198.18.1.0/24\"]\ntoa_kind = 200\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
        &a,
    )
    .expect("valid");
    assert_eq!(nets(&c.trust.toa), ["198.18.9.0/24"]);
    // IPIP falls back to trusted_lbs when XDP is on and it has no list.
    let c = with(
        "trusted_lbs = [\"198.18.1.0/24\"]\nxdp = [\"eth1\"]",
        &args(),
    )
    .expect("valid");
    assert_eq!(nets(&c.trust.ipip), ["198.18.1.0/24"]);
    assert!(c.trust.toa.is_empty());
    // TOA trusted from its own list only: nobody is trusted for PROXY protocol.
    let c = with(
        "toa_kind = 254\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
        &args(),
    )
    .expect("valid");
    assert!(c.trust.proxy.is_empty());
    assert_eq!(nets(&c.trust.toa), ["198.18.7.0/24"]);
}

#[test]
fn a_list_for_a_mechanism_that_is_off_or_a_mechanism_with_no_list_is_refused() {
    for (text, key) in [
        ("toa_trusted_lbs = [\"198.18.7.0/24\"]", "toa_trusted_lbs"),
        (
            "toa_kind = 0\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
            "toa_trusted_lbs",
        ),
        ("toa_kind = 254", "toa_trusted_lbs"),
        ("ipip_trusted_lbs = [\"198.18.7.0/24\"]", "ipip_trusted_lbs"),
        ("xdp = [\"eth1\"]", "ipip_trusted_lbs"),
    ] {
        let err = with(text, &args()).expect_err(text);
        assert_eq!(key_of(err), key, "{text}");
    }
    let many: Vec<String> = (0..1025u32)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let text = format!("toa_kind = 254\ntoa_trusted_lbs = [{}]", many.join(", "));
    assert_eq!(
        key_of(with(&text, &args()).expect_err("too many")),
        "toa_trusted_lbs"
    );
}

#[test]
fn prefixes_are_normalised_and_whole_families_warned_about_by_key() {
    let c = with(
        r#"trusted_lbs = ["::ffff:198.18.1.0/120", "198.18.1.0/24", "198.18.2.9/24"]"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24", "198.18.2.0/24"]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let c = with(
        r#"trusted_lbs = ["0.0.0.0/0"]
           toa_kind = 254
           xdp = ["eth1"]
           ipip_trusted_lbs = ["::/0"]"#,
        &args(),
    )
    .expect("valid, with warnings");
    let keys: Vec<&str> = c.warnings.iter().map(|w| w.key).collect();
    assert_eq!(
        keys,
        ["trusted_lbs", "ipip_trusted_lbs"],
        "{:?}",
        c.warnings
    );
    let text = c.warnings[0].to_string();
    assert!(
        text.contains("0.0.0.0/0 covers every IPv4 address"),
        "{text}"
    );
    assert!(text.contains("PROXY protocol, TOA"), "{text}");
    assert!(!text.contains("IPIP"), "IPIP has its own list: {text}");
    let c = with(
        r#"toa_kind = 254
                    toa_trusted_lbs = ["::ffff:0.0.0.0/96"]"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(nets(&c.trust.toa), ["0.0.0.0/0"]);
    assert_eq!(c.warnings.len(), 1);
    assert_eq!(c.warnings[0].key, "toa_trusted_lbs");
}

#[test]
fn backend_modes_balance_and_health_checks() {
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:80"]
           backends = ["a:80", "b:80"]
           mode = "pin"
           balance = "hash"
           http2 = true
           [health_check]
           path = "/healthz"
           interval_secs = 0.5"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(c.mode, Mode::Pin);
    assert_eq!(c.balance, Balance::Hash);
    assert!(c.http2);
    let h = c.health_check.as_ref().expect("health check");
    assert_eq!((h.path.as_str(), h.expect_status), ("/healthz", 200));
    assert_eq!(h.interval, Duration::from_millis(500));
    let again = Config::from_toml(&c.to_toml(), &args()).expect("round trip");
    assert_eq!(again.to_toml(), c.to_toml());
    for (text, key) in [
        ("[health_check]\npath = \"healthz\"", "health_check.path"),
        (
            "[health_check]\nexpect_status = 42",
            "health_check.expect_status",
        ),
        (
            "[health_check]\ninterval_secs = 0",
            "health_check.interval_secs",
        ),
    ] {
        let doc = format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n{text}");
        assert_eq!(
            key_of(Config::from_toml(&doc, &args()).expect_err(text)),
            key
        );
    }
}

#[test]
fn tls_limits_and_user() {
    let c = Config::from_toml(
        r#"listen = [{ address = "0.0.0.0:443", tls = [{ cert = "/a.pem", key = "/a.key" }] }]
           backends = ["b:80"]
           user = "ntlm-tag"
           [limits]
           max_connections = 5
           max_header_bytes = 16384"#,
        &args(),
    )
    .expect("valid");
    assert_eq!(c.listeners[0].tls[0].cert, PathBuf::from("/a.pem"));
    assert_eq!(c.limits.max_connections, 5);
    assert_eq!(c.user.as_deref(), Some("ntlm-tag"));
    let again = Config::from_toml(&c.to_toml(), &args()).expect("round trip");
    assert_eq!(again.to_toml(), c.to_toml());
    for (text, key) in [
        ("[limits]\nmax_connections = 0", "limits.max_connections"),
        ("[limits]\nmax_header_bytes = 10", "limits.max_header_bytes"),
        ("user = \"a b\"", "user"),
    ] {
        let doc = format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n{text}");
        assert_eq!(
            key_of(Config::from_toml(&doc, &args()).expect_err(text)),
            key
        );
    }
    let mut a = args();
    a.tls_cert = vec!["/x.pem".into()];
    assert_eq!(
        key_of(
            Config::from_toml("listen = [\"0.0.0.0:1\"]\nbackends = [\"a:1\"]", &a)
                .expect_err("pairs")
        ),
        "tls"
    );
}

/// The packaged example has every key (commented out, or set like `user`); uncommented, it must
/// be a valid configuration.
#[test]
fn the_packaged_example_lists_valid_keys() {
    let example = include_str!("../../../packaging/ntlm-tag.toml");
    let uncommented: String = example
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| {
            let key = l.split([' ', '=']).next().unwrap_or("");
            l.starts_with('[')
                || (l.contains(" = ")
                    && !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    // Files named in the example do not exist here, and the example's user may not either.
    let uncommented: String = uncommented
        .lines()
        .filter(|l| !l.starts_with("admin_token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let uncommented = uncommented.replace(
        "tls = [{ cert = \"/etc/ntlm-tag/tls.pem\", key = \"/etc/ntlm-tag/tls.key\" }]",
        "proxy_protocol = false",
    );
    let c =
        Config::from_toml(&uncommented, &args()).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(c.listeners.len(), 3);
    assert!(c.health_check.is_some());
    assert_eq!(c.routes.len(), 1, "the route example");
    assert!(c.routes[0].health_check.is_some());
    assert!(
        example
            .lines()
            .any(|l| l.trim() == format!("admin = \"{}\"", crate::cli::DEFAULT_ADMIN_SOCKET)),
        "the packaged default admin endpoint is the private unix socket"
    );
    for key in [
        "listen",
        "backends",
        "mode",
        "balance",
        "header",
        "id_template",
        "allow_reusable_ids",
        "forwarded_headers",
        "trusted_lbs",
        "toa_kind",
        "toa_trusted_lbs",
        "xdp",
        "ipip_trusted_lbs",
        "ebpf",
        "map_entries",
        "admin_token_file",
        "show_full_ids",
        "upgrade_socket",
        "workers",
        "http2",
        "user",
        "access_log",
        "log_format",
        "[limits]",
        "[timeouts]",
        "[health_check]",
        "[[route]]",
    ] {
        assert!(
            example.contains(&format!("# {key}")) || example.contains(&format!("\n{key} = ")),
            "the example documents {key}"
        );
    }
}

#[test]
fn upgrade_socket_is_an_absolute_path_and_the_upgrade_drain_has_a_long_default() {
    let c = with("", &args()).expect("base");
    assert_eq!(c.upgrade_socket, None, "upgrades are off unless configured");
    assert_eq!(c.timeouts.upgrade_drain, Duration::from_secs(3600));
    let c = with(
        "upgrade_socket = \"/run/ntlm-tag/upgrade.sock\"\n[timeouts]\nupgrade_drain_secs = 60",
        &args(),
    )
    .expect("valid");
    assert_eq!(
        c.upgrade_socket.as_deref(),
        Some(Path::new("/run/ntlm-tag/upgrade.sock"))
    );
    assert_eq!(c.timeouts.upgrade_drain, Duration::from_secs(60));
    for (text, key) in [
        ("upgrade_socket = \"upgrade.sock\"", "upgrade_socket"),
        ("upgrade_socket = \"/\"", "upgrade_socket"),
        (
            "[timeouts]\nupgrade_drain_secs = -1",
            "timeouts.upgrade_drain_secs",
        ),
    ] {
        let err = with(text, &args()).expect_err(text);
        assert_eq!(key_of(err), key, "{text}");
    }
}

fn token_file(mode: u32, token: &str) -> tempfile::NamedTempFile {
    use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(f, "{token}").expect("write");
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
    f
}

#[test]
fn admin_endpoints_tokens_and_full_ids() {
    const BASE: &str = "listen = [\"0.0.0.0:1\"]\nbackends = [\"b:80\"]\n";
    let c = Config::from_toml(
        &format!("{BASE}admin = \"unix:/run/ntlm-tag/admin.sock\""),
        &args(),
    )
    .expect("valid");
    let admin = c.admin.as_ref().expect("admin");
    assert_eq!(
        admin.endpoint,
        AdminEndpoint::Unix("/run/ntlm-tag/admin.sock".into())
    );
    assert!(admin.token.is_none());
    assert!(!c.show_full_ids, "hashes by default");

    let token = "0123456789abcdef0123456789abcdef";
    let good = token_file(0o600, token);
    let c = Config::from_toml(
        &format!(
            "{BASE}admin = \"127.0.0.1:9180\"\nadmin_token_file = \"{}\"\nshow_full_ids = true",
            good.path().display()
        ),
        &args(),
    )
    .expect("valid");
    assert!(c.show_full_ids);
    let read = c
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
        .expect("token");
    assert_eq!(read.expose(), token, "the final newline is not part of it");
    let effective = c.to_toml();
    assert!(!effective.contains(token), "{effective}");
    assert!(effective.contains(&good.path().display().to_string()));
    let again = Config::from_toml(&effective, &args()).expect("round trip");
    assert_eq!(again.to_toml(), effective);

    let world = token_file(0o644, token);
    let short = token_file(0o600, "secret");
    for (text, key) in [
        ("admin = \"unix:run/admin.sock\"".to_string(), "admin"),
        ("admin = \"localhost\"".to_string(), "admin"),
        (
            format!(
                "admin = \"unix:/run/a.sock\"\nadmin_token_file = \"{}\"",
                good.path().display()
            ),
            "admin_token_file",
        ),
        (
            format!("admin_token_file = \"{}\"", good.path().display()),
            "admin_token_file",
        ),
        (
            format!(
                "admin = \"127.0.0.1:1\"\nadmin_token_file = \"{}\"",
                world.path().display()
            ),
            "admin_token_file",
        ),
        (
            format!(
                "admin = \"127.0.0.1:1\"\nadmin_token_file = \"{}\"",
                short.path().display()
            ),
            "admin_token_file",
        ),
        (
            "admin = \"127.0.0.1:1\"\nadmin_token_file = \"/nonexistent/token\"".to_string(),
            "admin_token_file",
        ),
    ] {
        let doc = format!("{BASE}{text}");
        assert_eq!(
            key_of(Config::from_toml(&doc, &args()).expect_err(&doc)),
            key,
            "{doc}"
        );
    }
    let mut a = args();
    a.admin = Some("unix:/tmp/x.sock".into());
    a.show_full_ids = true;
    let c = Config::from_toml(BASE, &a).expect("flags");
    assert!(c.show_full_ids);
    assert_eq!(
        c.admin.expect("admin").endpoint.to_string(),
        "unix:/tmp/x.sock"
    );
}

#[test]
fn a_reload_does_not_read_the_admin_token_again() {
    // After `user = ...` the gateway may no longer read the (root's, 0600) token file: a reload
    // must still apply, and the endpoint keeps the token it started with.
    let mut config = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(
        &mut config,
        b"listen = [\"0.0.0.0:1\"]\nbackends = [\"b:80\"]\nadmin = \"127.0.0.1:9180\"\n\
          admin_token_file = \"/nonexistent/admin.token\"\n",
    )
    .expect("write");
    let mut a = args();
    a.config = Some(config.path().to_path_buf());
    assert_eq!(
        key_of(Config::load(&a).expect_err("unreadable at start")),
        "admin_token_file"
    );
    let reloaded = Config::load_for_reload(&a).expect("a reload skips the token");
    let admin = reloaded.admin.expect("admin");
    assert_eq!(
        admin.token_file.as_deref(),
        Some(Path::new("/nonexistent/admin.token"))
    );
    assert!(admin.token.is_none());
}

#[test]
fn reusable_template_needs_explicit_opt_in() {
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:1"]
           backends = ["b:80"]
           id_template = "{client_ip}:{client_port}"
           allow_reusable_ids = true"#,
        &args(),
    )
    .expect("allowed");
    assert!(c.identity.template.is_reusable());
}

#[test]
fn unknown_keys_and_bad_types_are_parse_errors() {
    for text in ["listn = []", "listen = 5", "ebpf = \"sometimes\""] {
        assert!(matches!(
            Config::from_toml(text, &args()),
            Err(ConfigError::Parse { .. })
        ));
    }
}

#[test]
fn effective_configuration_round_trips() {
    let c = Config::from_toml(
        r#"listen = ["0.0.0.0:8080"]
           backends = ["10.0.0.5:80"]
           admin = "127.0.0.1:9180""#,
        &args(),
    )
    .expect("valid");
    let again = Config::from_toml(&c.to_toml(), &args()).expect("effective config re-parses");
    assert_eq!(again.to_toml(), c.to_toml());
}

/// The keys a table of the file accepts, read from serde itself: the error for an unknown key
/// lists every expected one. A key added to a struct is then a key this test knows about.
fn schema_keys<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
    let err = toml::from_str::<T>("surely_not_a_key = 0").expect_err("unknown keys are refused");
    let message = err.to_string();
    let expected = message
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list of expected keys in {message:?}"))
        .1;
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no keys in {message:?}");
    keys
}

/// Every key of the file, top level and in every table, is documented in ntlm-tag.toml(5)
/// (as `\fBkey\fR`), and every key the page documents exists: the page cannot drift.
#[test]
fn the_manual_page_documents_every_key() {
    let page = crate::manual::CONFIG_PAGE;
    let keys: Vec<String> = [
        schema_keys::<FileConfig>(),
        schema_keys::<ListenerConfig>(),
        schema_keys::<TlsCertConfig>(),
        schema_keys::<BackendTable>(),
        schema_keys::<LimitsFile>(),
        schema_keys::<TimeoutsFile>(),
        schema_keys::<LockoutFile>(),
        schema_keys::<HealthCheckFile>(),
        schema_keys::<RouteFile>(),
        schema_keys::<RouteTimeoutFile>(),
        schema_keys::<UpstreamCapsFile>(),
    ]
    .concat();
    assert!(keys.len() > 40, "{keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !page.contains(&format!("\\fB{k}\\fR")))
        .collect();
    assert!(missing.is_empty(), "ntlm-tag.toml(5) lacks {missing:?}");
    // `\fBkey\fR = \fItype\fR` entries (and `\fBkey\fR (default ...)` in [timeouts]).
    let documented: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("\\fB"))
        .filter_map(|l| l.split_once("\\fR"))
        .filter(|(_, rest)| rest.starts_with(" = ") || rest.starts_with(" (default"))
        .map(|(key, _)| key)
        .collect();
    let unknown: Vec<&&str> = documented
        .iter()
        .filter(|k| !keys.iter().any(|key| key == *k))
        .collect();
    assert!(
        unknown.is_empty(),
        "ntlm-tag.toml(5) documents unknown keys {unknown:?}"
    );
}
