//! Auth-aware connections and the lockout guard, with real NTLM: `curl --ntlm` clients and the
//! NTLMv2 test acceptor as an IIS-like backend (NTLM keyed on its own TCP connection).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying, curl_ntlm},
    fixtures,
    gateway::Gateway,
    topology::Topology,
    wait::{eventually_within, scaled, time_scale},
};
use serde_json::Value;

const RIGHT: &str = "Right-Password-1";
const WRONG: &str = "wrong-password";

fn users() -> Vec<(String, String)> {
    acceptor::users(&[("alice", RIGHT), ("bob", RIGHT)])
}

/// The final status of one `curl --ntlm` run and its `Retry-After`, if the answer had one.
#[derive(Debug)]
struct Login {
    status: u16,
    retry_after: Option<u64>,
    users: Vec<String>,
}

fn login(topo: &Topology, source: IpAddr, user: &str, password: &str) -> Login {
    let url = format!("http://{}/mail", Topology::gateway_addr());
    let run = curl_ntlm(
        &topo.client,
        source,
        user,
        password,
        &[url],
        &["-D", "-", "-w", "\ncode=%{http_code}\n"],
    );
    assert!(run.success, "curl as {user} from {source}: {}", run.stderr);
    let status = run.final_status();
    let retry_after = run.stdout.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())?
    });
    Login {
        status,
        retry_after,
        users: run.users(),
    }
}

/// Type3s (NTLM message type 3) the backend saw from `user`'s attempts that it refused.
fn refused_type3s(backend: &Acceptor) -> usize {
    backend
        .requests()
        .iter()
        .filter(|r| r["ntlm_message"] == 3 && r["status"] == 401)
        .count()
}

/// The IIS-like backend: NTLM keyed on its own TCP connection.
fn start_backend(topo: &Topology) -> Acceptor {
    Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Connection,
    )
}

/// A gateway in front of `backend` whose lockout guard has a `window` and allows `allowed`.
fn start_gateway(
    topo: &Topology,
    backend: &Acceptor,
    window: Duration,
    allowed: IpAddr,
) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{}\"]\nbackends = [\"{}\"]\nebpf = \"required\"\n\
             [lockout]\nwindow_secs = {}\nallow = [\"{allowed}/32\"]\n",
            Topology::gateway_addr(),
            backend.addr,
            window.as_secs_f64(),
        ),
    );
    // The gateway reads its file at start; the directory may go once it is ready.
    Gateway::from_config(&config).start(&topo.gateway)
}

/// A client looping on a wrong password is stopped at the default threshold (4) before the backend
/// sees a fifth attempt, whatever case it spells the name in; the same user with the right password
/// from another address still logs in; an allowlisted address is never stopped; once the window
/// has passed, the stopped address may log in again.
#[test]
fn a_looping_client_is_stopped_before_the_domain_would_lock_the_account() {
    let topo = Topology::new();
    let backend = start_backend(&topo);
    // Long enough for the attempts below even under TCG, short enough to await its end.
    let window = Duration::from_secs(6 * u64::from(time_scale()));
    let looping = Topology::client_v4(0);
    let elsewhere = Topology::client_v4(1);
    let allowed = Topology::client_v4(2);
    let gw = start_gateway(&topo, &backend, window, allowed);

    let first_failure = Instant::now();
    let spellings = ["alice", "ALICE", "Alice", "alice", "aLiCe", "alice"];
    let attempts: Vec<Login> = spellings
        .iter()
        .map(|user| login(&topo, looping, user, WRONG))
        .collect();
    let statuses: Vec<u16> = attempts.iter().map(|l| l.status).collect();
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 429, 429],
        "four failures reach the backend, then the gateway answers itself: {attempts:?}"
    );
    assert_eq!(
        refused_type3s(&backend),
        4,
        "the backend (and so the domain controller) saw no more than the threshold"
    );
    let retry_after = attempts[4].retry_after.expect("429 carries Retry-After");
    assert!(
        (1..=window.as_secs()).contains(&retry_after),
        "Retry-After {retry_after} within the {window:?} window"
    );
    let refused = gw
        .wait_for_line(
            "NTLM login refused before the backend",
            scaled(Duration::from_secs(5)),
        )
        .expect("a refusal log line");
    assert!(
        refused.to_lowercase().contains("user=alice") && refused.contains(&looping.to_string()),
        "{refused}"
    );

    // The same user with the right password from another address logs in.
    let other = login(&topo, elsewhere, "alice", RIGHT);
    assert_eq!(
        (other.status, other.users),
        (200, vec!["alice".to_string()])
    );

    // An allowlisted address is never stopped: every attempt reaches the backend.
    for i in 0..6 {
        assert_eq!(
            login(&topo, allowed, "bob", WRONG).status,
            401,
            "attempt {i}"
        );
    }
    assert_eq!(refused_type3s(&backend), 4 + 6);

    // The looping address stays stopped until its oldest failure leaves the window, then the
    // right password goes through again. Polled (each poll a real login), bounded by a deadline.
    let deadline = first_failure + window + scaled(Duration::from_secs(10));
    let mut polls = 0;
    let released = loop {
        let attempt = login(&topo, looping, "alice", RIGHT);
        polls += 1;
        if attempt.status == 200 {
            break attempt;
        }
        assert_eq!(attempt.status, 429, "{attempt:?}");
        assert!(
            Instant::now() < deadline,
            "still refused after the window: {attempt:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        first_failure.elapsed() >= window,
        "released before the window ended"
    );
    assert!(
        polls > 1,
        "the first attempt after the 429s was refused too"
    );
    assert_eq!(released.users, vec!["alice".to_string()]);

    let metrics = gw.admin_metrics();
    for line in [
        "ntlm_tag_lockout_failures_total 4",
        "ntlm_tag_lockout_refused_total{key=\"user_at_address\"}",
        "ntlm_tag_connections_by_auth_state{state=\"authenticated\"}",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        !metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .any(|l| l.contains("alice")),
        "no user name in any metric label"
    );
}

/// Each connection's NTLM state shows in `/connections` and in the access log: authenticated as
/// the user while the connection lives, failed after a refused Type3.
#[test]
fn the_connection_table_and_access_log_show_who_is_authenticated() {
    let topo = Topology::new();
    let backend = start_backend(&topo);
    let gw = start_gateway(
        &topo,
        &backend,
        Duration::from_secs(1800),
        Topology::client_v4(9),
    );
    let source = Topology::client_v4(3);
    // Four requests on one connection, one every second: the connection stays open and
    // authenticated between them while the table is read.
    let url = format!("http://{}/inbox", Topology::gateway_addr());
    let urls = vec![url; 4];
    let client = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            curl_ntlm(
                &topo.client,
                source,
                "bob",
                RIGHT,
                &urls,
                &["--rate", "1/s"],
            )
        });
        let row_of_source = |rows: &Value| {
            rows.as_array().and_then(|rows| {
                rows.iter()
                    .find(|r| {
                        r["client"]
                            .as_str()
                            .is_some_and(|c| c.starts_with(&source.to_string()))
                    })
                    .cloned()
            })
        };
        let rows = eventually_within(
            "an authenticated row for bob",
            scaled(Duration::from_secs(10)),
            || gw.admin_json("/connections"),
            |rows| row_of_source(rows).is_some_and(|r| r["auth"] == "authenticated"),
        );
        let row = row_of_source(&rows).expect("the row just seen");
        assert_eq!(row["user"], "bob", "{row}");
        run.join().expect("curl thread")
    });
    assert!(client.success, "{}", client.stderr);
    assert_eq!(client.users(), vec!["bob".to_string(); 4]);
    // Quoted or not, as the log format writes the value.
    let access = gw
        .wait_for_line_where(
            |l| l.contains("auth=\"authenticated\"") || l.contains("auth=authenticated"),
            scaled(Duration::from_secs(5)),
        )
        .expect("an access line with the auth state");
    assert!(access.contains("bob"), "{access}");

    let failed = login(&topo, source, "bob", WRONG);
    assert_eq!(failed.status, 401);
    let line = gw
        .wait_for_line("NTLM login failed", scaled(Duration::from_secs(5)))
        .expect("a failed-login log line");
    assert!(
        line.contains("bob") && line.contains("failures=1"),
        "{line}"
    );
    // The access line is written once the response has been sent, after the login line.
    gw.wait_for_line_where(
        |l| l.contains("auth=failed") || l.contains("auth=\"failed\""),
        scaled(Duration::from_secs(5)),
    )
    .expect("the access line of the refused Type3 says failed");
}
