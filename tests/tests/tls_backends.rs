//! Backends over TLS: the NTLM test acceptor serving HTTPS (an IIS site with an https binding), the
//! gateway's rustls client verifying it against a CA file and a server name, real `curl --ntlm`
//! logins through it, health checks and failover over TLS, and a backend the gateway must not
//! trust.

use std::{net::SocketAddr, path::Path, time::Duration};

use ntlm_tag_tests::{
    acceptor::{Acceptor, Keying, curl_ntlm},
    fixtures,
    gateway::{Gateway, Started},
    topology::Topology,
    wait::scaled,
};

fn users() -> Vec<(String, String)> {
    (0..4)
        .map(|i| (format!("user{i}"), format!("Tls-Secret-{i}!")))
        .collect()
}

/// A test CA that issues server certificates.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pem_path: String,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem_path = fixtures::write(dir, &format!("{name}.pem"), &cert.pem());
        TestCa {
            cert,
            key,
            pem_path,
        }
    }

    /// A certificate for `name` (SAN); returns (cert path, key path).
    fn issue(&self, dir: &Path, name: &str, file: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        (
            fixtures::write(dir, &format!("{file}.pem"), &cert.pem()),
            fixtures::write(dir, &format!("{file}.key"), &key.serialize_pem()),
        )
    }
}

fn https_acceptor(topo: &Topology, port: u16, cert: &(String, String)) -> Acceptor {
    Acceptor::start_with(
        &topo.backend,
        Topology::backend_at(port),
        &users(),
        Keying::Connection,
        &["--tls-cert", &cert.0, "--tls-key", &cert.1],
    )
}

/// The gateway `config` describes, written to a file in `dir`, with the kernel programs required.
fn start_gateway(topo: &Topology, dir: &Path, config: &str) -> Gateway {
    let path = fixtures::write(dir, "ntlm-tag.toml", config);
    Gateway::from_config(path)
        .ebpf("required")
        .start(&topo.gateway)
}

/// Every user logs in with `curl --ntlm` on one connection (3 requests); every answer is theirs.
fn every_user_logs_in(topo: &Topology) {
    for (i, (user, password)) in users().iter().enumerate() {
        let urls: Vec<String> = (0..3)
            .map(|r| Topology::url(&format!("/u{i}/r{r}")))
            .collect();
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(i as u8),
            user,
            password,
            &urls,
            &[],
        );
        assert!(run.success, "{user}: {}", run.stderr);
        assert_eq!(run.users(), vec![user.clone(); 3], "{user}: {}", run.stdout);
    }
}

#[test]
fn users_log_in_with_real_ntlm_through_https_backends_checked_and_failed_over_over_tls() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "test-ca");
    let cert = ca.issue(dir.path(), "iis.backend.test", "backend");
    let mut a = https_acceptor(&topo, 8443, &cert);
    let b = https_acceptor(&topo, 8444, &cert);
    let config = format!(
        r#"listen = ["{gw}"]
backends = [
  {{ address = "https://{a}", tls_server_name = "iis.backend.test", ca_file = "{ca}" }},
  {{ address = "https://{b}", tls_server_name = "iis.backend.test", ca_file = "{ca}" }},
]
[health_check]
path = "/healthz"
interval_secs = 0.2
"#,
        gw = Topology::gateway_addr(),
        a = a.addr,
        b = b.addr,
        ca = ca.pem_path,
    );
    let gw = start_gateway(&topo, dir.path(), &config);
    // The acceptors speak nothing but TLS: a health check they log came over a verified handshake.
    for acceptor in [&a, &b] {
        acceptor.wait_for_request("/healthz", scaled(Duration::from_secs(10)), |r| {
            r["path"] == "/healthz"
        });
    }
    every_user_logs_in(&topo);
    let served = |x: &Acceptor| {
        x.requests()
            .iter()
            .filter(|r| r["user"].is_string())
            .count()
    };
    assert!(
        served(&a) > 0 && served(&b) > 0,
        "both TLS backends served logins: {} and {}",
        served(&a),
        served(&b)
    );
    // One backend dies: new logins go to the other one over TLS.
    a.kill();
    let before = served(&b);
    every_user_logs_in(&topo);
    assert!(
        served(&b) >= before + 3 * users().len(),
        "the survivor served every login"
    );
    // Read to its end, the whole log: a line about an early login may still be on its way before.
    let (_, log) = gw.stop_with_log();
    assert!(
        log.iter().all(|l| !l.contains("invalid peer certificate")),
        "the certificates verified"
    );
}

#[test]
fn a_backend_whose_certificate_the_gateway_does_not_trust_gets_no_request() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let trusted = TestCa::new(dir.path(), "trusted-ca");
    let other = TestCa::new(dir.path(), "other-ca");
    // Signed by a CA the gateway does not trust; then a trusted certificate for another name.
    let untrusted = https_acceptor(
        &topo,
        8443,
        &other.issue(dir.path(), "iis.backend.test", "untrusted"),
    );
    let wrong_name = https_acceptor(
        &topo,
        8444,
        &trusted.issue(dir.path(), "elsewhere.test", "wrong-name"),
    );
    for (acceptor, reason) in [
        (&untrusted, "UnknownIssuer"),
        (&wrong_name, "not valid for name"),
    ] {
        let config = format!(
            r#"listen = ["{gw}"]
backends = [{{ address = "https://{addr}", tls_server_name = "iis.backend.test", ca_file = "{ca}" }}]
"#,
            gw = Topology::gateway_addr(),
            addr = acceptor.addr,
            ca = trusted.pem_path,
        );
        let gw = start_gateway(&topo, dir.path(), &config);
        let (user, password) = &users()[0];
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(0),
            user,
            password,
            &[format!("http://{}/x", Topology::gateway_addr())],
            &["-o", "/dev/null", "-w", "%{http_code}"],
        );
        assert_eq!(run.stdout, "502", "{reason}: {}", run.stderr);
        let line = gw
            .wait_for_line("ca_file", scaled(Duration::from_secs(5)))
            .unwrap_or_else(|| panic!("{reason}: no log line names the certificate problem"));
        assert!(line.contains(reason), "{line}");
        assert!(
            acceptor.requests().is_empty(),
            "{reason}: no request reached a backend the gateway does not trust"
        );
        drop(gw);
    }
}

/// `epa_bridging = true` with a TLS listener on `listener_cert` and one TLS backend.
fn bridging_config(listener_cert: &(String, String), backend: SocketAddr, ca: &str) -> String {
    format!(
        r#"listen = [{{ address = "{gw}", tls = [{{ cert = "{cert}", key = "{key}" }}] }}]
backends = [{{ address = "https://{backend}", tls_server_name = "iis.backend.test", ca_file = "{ca}" }}]
epa_bridging = true
"#,
        gw = SocketAddr::new(Topology::gateway_addr().ip(), 8443),
        cert = listener_cert.0,
        key = listener_cert.1,
    )
}

/// `ntlm-tag check --config FILE` in the gateway's namespace: (exit code, stdout).
fn check(topo: &Topology, config: &str) -> (Option<i32>, String) {
    let gateway_bin = ntlm_tag_tests::gateway::binary();
    let out = topo
        .gateway
        .command(gateway_bin.to_str().expect("path"))
        .args(["check", "--config", config])
        .output()
        .expect("run ntlm-tag check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn epa_bridging_checks_that_backends_present_the_listeners_certificate_at_start_reload_and_check() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "test-ca");
    // The site's certificate, on the listener and on the bridged backend; another backend with a
    // certificate of its own (valid, same CA, same name: only bridging can tell).
    let site = ca.issue(dir.path(), "iis.backend.test", "site");
    let own = ca.issue(dir.path(), "iis.backend.test", "own");
    let same = https_acceptor(&topo, 8443, &site);
    let other = https_acceptor(&topo, 8444, &own);

    let good = fixtures::write(
        dir.path(),
        "good.toml",
        &bridging_config(&site, same.addr, &ca.pem_path),
    );
    let bad = fixtures::write(
        dir.path(),
        "bad.toml",
        &bridging_config(&site, other.addr, &ca.pem_path),
    );
    let (code, out) = check(&topo, &good);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("presents the same certificate as listener"),
        "{out}"
    );
    let (code, out) = check(&topo, &bad);
    assert_eq!(
        code,
        Some(64),
        "a different certificate is a configuration error: {out}"
    );
    let line = out
        .lines()
        .find(|l| l.contains("presents certificate sha256"))
        .unwrap_or_else(|| panic!("check names the backend whose certificate differs: {out}"));
    assert!(line.contains(&format!("https://{}", other.addr)), "{line}");
    assert!(line.contains("Install the same certificate"), "{line}");

    // Start-up refuses the mismatch, naming it.
    match Gateway::from_config(&bad)
        .ebpf("required")
        .try_start(&topo.gateway)
    {
        Started::Exited { status, log } => {
            assert_eq!(status.code(), Some(64), "{}", log.join("\n"));
            assert!(
                log.iter()
                    .any(|l| l.contains("ERROR") && l.contains("presents certificate sha256")),
                "{}",
                log.join("\n")
            );
        }
        Started::Ready(_) => panic!("started with a mismatched backend"),
    }

    // Starts with the same certificate; a reload to the other backend is refused.
    let live = fixtures::write(
        dir.path(),
        "live.toml",
        &std::fs::read_to_string(&good).expect("read"),
    );
    let gw = Gateway::from_config(&live)
        .ebpf("required")
        .start(&topo.gateway);
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("presents the same certificate"))
    );
    std::fs::copy(&bad, &live).expect("swap the configuration");
    gw.signal(libc::SIGHUP);
    gw.wait_for_line("reload refused", scaled(Duration::from_secs(10)))
        .expect("the reload to a mismatched backend is refused");
}

/// An IIS-like HTTPS backend with Extended Protection required for its own certificate.
fn epa_acceptor(topo: &Topology, port: u16, cert: &(String, String)) -> Acceptor {
    Acceptor::start_with(
        &topo.backend,
        Topology::backend_at(port),
        &users(),
        Keying::Connection,
        &[
            "--tls-cert",
            &cert.0,
            "--tls-key",
            &cert.1,
            "--require-channel-binding",
        ],
    )
}

#[test]
fn an_epa_protected_login_passes_through_the_gateway_only_when_it_bridges_the_same_certificate() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "test-ca");
    let site = ca.issue(dir.path(), "iis.backend.test", "site");
    let own = ca.issue(dir.path(), "iis.backend.test", "own");
    let bridged = epa_acceptor(&topo, 8443, &site);
    let offloaded = epa_acceptor(&topo, 8444, &own);
    let (user, password) = users()[0].clone();
    let gateway_ip = Topology::gateway_addr().ip();

    // The client and the acceptor agree on channel bindings when the client sees the backend's
    // own certificate (from the gateway's namespace, straight to the backend).
    let direct = ntlm_tag_tests::epa_client::login(
        &topo.gateway,
        "198.18.2.1".parse().expect("ip"),
        &format!("https://{}/direct", offloaded.addr),
        (&user, &password),
        &ca.pem_path,
        "iis.backend.test",
    );
    assert_eq!(
        direct.status, 200,
        "direct EPA login: {} {}",
        direct.body, direct.stderr
    );

    // Bridging: the listener presents the backend's certificate, so the binding matches.
    let bridging = fixtures::write(
        dir.path(),
        "bridging.toml",
        &bridging_config(&site, bridged.addr, &ca.pem_path),
    );
    let gw = Gateway::from_config(&bridging)
        .ebpf("required")
        .start(&topo.gateway);
    let url = format!("https://{}/epa", SocketAddr::new(gateway_ip, 8443));
    let run = ntlm_tag_tests::epa_client::login(
        &topo.client,
        Topology::client_v4(0),
        &url,
        (&user, &password),
        &ca.pem_path,
        "iis.backend.test",
    );
    assert_eq!(
        run.status, 200,
        "EPA login through the gateway: {} {}",
        run.body, run.stderr
    );
    assert!(run.body.contains(&format!("user={user}")), "{}", run.body);
    // Read to its end, the whole log: the client can hold the 200 before a line reaches us.
    let (_, log) = gw.stop_with_log();
    assert!(
        !log.iter().any(|l| l.contains("Extended Protection:")),
        "no refusal to explain"
    );

    // The same gateway in front of a backend with another certificate (no bridging check): the
    // client's binding names the gateway's certificate and the backend refuses it.
    let mismatched = format!(
        r#"listen = [{{ address = "{listen}", tls = [{{ cert = "{cert}", key = "{key}" }}] }}]
backends = [{{ address = "https://{backend}", tls_server_name = "iis.backend.test", ca_file = "{ca}" }}]
"#,
        listen = SocketAddr::new(gateway_ip, 8443),
        cert = site.0,
        key = site.1,
        backend = offloaded.addr,
        ca = ca.pem_path,
    );
    let mismatched = fixtures::write(dir.path(), "mismatched.toml", &mismatched);
    let gw = Gateway::from_config(&mismatched)
        .ebpf("required")
        .start(&topo.gateway);
    let run = ntlm_tag_tests::epa_client::login(
        &topo.client,
        Topology::client_v4(1),
        &url,
        (&user, &password),
        &ca.pem_path,
        "iis.backend.test",
    );
    assert_eq!(
        run.status, 401,
        "a mismatched certificate: {} {}",
        run.body, run.stderr
    );
    let refused: Vec<String> = offloaded
        .requests()
        .iter()
        .filter_map(|r| r["refused"].as_str().map(str::to_string))
        .collect();
    assert!(
        refused
            .iter()
            .any(|r| r.contains("does not match this server's certificate")),
        "the backend refused the binding, not the password: {refused:?}"
    );
    // The gateway reads the Type3's AV pairs and says why, and what to change.
    let line = gw
        .wait_for_line("Extended Protection:", scaled(Duration::from_secs(5)))
        .expect("a diagnostic line for the refused EPA login");
    for part in [
        "cause=\"certificate_differs\"",
        "channel binding present",
        "target name HTTP/iis.backend.test",
        "Install the same certificate and key on the listener and the backend",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
    }
    let metrics = gw.admin_metrics();
    assert!(
        metrics.contains("ntlm_tag_epa_refusals_total{cause=\"certificate_differs\"} 1"),
        "{metrics}"
    );
}
